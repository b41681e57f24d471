"""The ``phivlm`` command line: one subcommand per job, each with ``--help`` (the jobs themselves: ``commands``)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import commands as c
from .config import RunConfig, add_config_args, stage_defaults
from .errors import PhivlmError

# the config fields `phivlm features` takes: the tower and where its cache goes, as the training runs read them
FEATURE_FIELDS = ("model.vision", "model.feature_layer", "model.image_size", "model.image_tokens",
                  "model.image_tiles", "data.images",
                  "data.features", "data.limit", "train.seed", "train.workers", "train.device", "train.precision")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per answer (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this "
                                                            "probability mass (default: 1 = all)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="make tokens already seen this much less likely (default: 1 = off)")
    g.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N "
                                                    "(default: auto)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def add_trust_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint that asks for trust_remote_code to run its LM's own Python code")


def answers(s: argparse.ArgumentParser, func) -> None:
    """The flags every command that generates answers shares, and its function."""
    add_generation_args(s)
    add_trust_flag(s)
    s.set_defaults(func=func)


def add_checkpoint(s: argparse.ArgumentParser, what: str = "checkpoint: a run folder or its checkpoint folder"
                   ) -> None:
    s.add_argument("--checkpoint", required=True, help=what)


def add_nproc(s: argparse.ArgumentParser) -> None:
    s.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun; "
                                                        "default: 1)")


def command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``text`` is both its entry in the parent's list and its --help description."""
    return sub.add_parser(name, help=text, description=text)


def add_training_commands(sub) -> None:
    s = command(sub, "features", "encode images once with the frozen vision tower into the feature cache")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="COCO or LLaVA annotation file(s) whose images are encoded")
    s.add_argument("--batch-size", type=int, default=64, help="images per vision-tower batch (default: 64)")
    add_config_args(s, RunConfig(), only=FEATURE_FIELDS)
    s.set_defaults(func=c.cmd_features)

    s = command(sub, "pretrain", "stage 1: train the projector on image captions, the LM frozen")
    add_nproc(s)
    add_config_args(s, stage_defaults("pretrain"))
    s.set_defaults(func=c.cmd_pretrain)

    s = command(sub, "finetune", "stage 2: instruction finetuning of projector and LM (LoRA, QLoRA, full)")
    add_checkpoint(s, "stage-1 (or earlier stage-2) checkpoint to start from")
    s.add_argument("--merge", action="store_true", help="also write a merged standalone model")
    add_nproc(s)
    add_config_args(s, stage_defaults("finetune"))
    s.set_defaults(func=c.cmd_finetune)

    s = command(sub, "merge", "merge a LoRA/QLoRA checkpoint into a standalone one")
    add_checkpoint(s, "LoRA or QLoRA checkpoint")
    s.add_argument("--out", required=True, help="folder for the merged checkpoint")
    add_trust_flag(s)
    s.set_defaults(func=c.cmd_merge)


def add_inference_commands(sub) -> None:
    s = command(sub, "caption", "caption images with a checkpoint")
    add_checkpoint(s)
    s.add_argument("--image", nargs="+", required=True, help="image file(s) to caption")
    answers(s, c.cmd_caption)

    s = command(sub, "chat", "interactive multi-turn chat about an image in the terminal")
    add_checkpoint(s)
    s.add_argument("--image", required=True, help="the image the conversation is about")
    answers(s, c.cmd_chat)

    s = command(sub, "generate", "batch answers for a JSONL of {image, prompt} rows")
    add_checkpoint(s)
    s.add_argument("--input", required=True, help="JSONL file, one {\"image\": ..., \"prompt\": ...} per line")
    s.add_argument("--output", required=True, help="JSONL file written: each input row with its \"answer\"")
    s.add_argument("--images", default="", help="folder the 'image' paths are relative to")
    s.add_argument("--batch-size", type=int, default=8, help="prompts answered at once (default: 8)")
    answers(s, c.cmd_generate)

    s = command(sub, "export", "write a checkpoint as a Hugging Face model folder (LoRA merged)")
    add_checkpoint(s)
    s.add_argument("--out", required=True, help="folder for the exported model")
    s.add_argument("--format", default="auto", choices=["auto", "llava", "phivlm"],
                   help="llava: LlavaForConditionalGeneration (linear / mlp2x_gelu projectors); phivlm: phivlm's "
                        "own model class (any projector; needs `import phivlm`); auto: llava where exact")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype on disk")
    s.add_argument("--metrics", help="phivlm eval's metrics.json for the model card (default: the checkpoint's "
                                     "run folder, or an eval folder beside it that names this checkpoint)")
    s.set_defaults(func=c.cmd_export)

    s = command(sub, "serve", "web demo (Gradio): upload an image and chat about it")
    add_checkpoint(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = every interface)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    s.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    s.add_argument("--concurrency", type=int, default=1, help="requests answered at once; the rest queue")
    answers(s, c.cmd_serve)

    s = command(sub, "eval", "score a checkpoint on held-out Q&A and/or captions, with grounding baselines")
    add_checkpoint(s)
    s.add_argument("--data", required=True, help="COCO captions JSON, LLaVA conversations JSON, or JSONL of "
                                                 "{image, question, answer[, type]}")
    s.add_argument("--images", required=True, help="image folder")
    s.add_argument("--captions", help="also caption the images of this COCO captions file")
    s.add_argument("--out", default="runs/eval", help="folder for metrics.json, report.md and thumbnails")
    s.add_argument("--limit", type=int, default=0, help="first N images of each file (0 = all)")
    s.add_argument("--batch-size", type=int, default=32, help="images answered at once (default: 32)")
    s.add_argument("--baselines", default="blind,shuffled",
                   help="grounding baselines, comma-separated: blind (image features zeroed), "
                        "shuffled (another image's)")
    s.add_argument("--no-baselines", action="store_true", help="skip the grounding baselines")
    s.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    add_trust_flag(s)
    s.set_defaults(func=c.cmd_eval)


def add_demo_and_bench(sub) -> None:
    s = command(sub, "demo", "end to end: synthetic data, stage 1, stage 2, held-out accuracy")
    s.add_argument("--out", default="runs/demo", help="folder for the demo's data, runs and report")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random models (seconds, for tests)")
    size.add_argument("--long", action="store_true", help="more training steps for a stronger result (~3x the time)")
    s.set_defaults(func=c.cmd_demo)

    s = command(sub, "bench", "speed and memory against the transformers Llava reference (see BENCHMARKS.md)")
    s.add_argument("--quick", action="store_true", help="tiny models, a smoke run of seconds")
    s.add_argument("--out", help="write every figure to this JSON file")
    s.add_argument("--figures", default="stage1,stage2,features,demo_features,generation",
                   help="comma-separated subset")
    s.add_argument("--threads", type=int, default=0, help="torch threads for both contenders (default: "
                                                          "OMP_NUM_THREADS, else torch's choice)")
    s.add_argument("--rounds", type=int, default=0, help="timed rounds per figure (default 4; 2 with --quick)")
    s.add_argument("--batches", type=int, default=0, help="distinct training batches cycled (default 2)")
    s.add_argument("--batch-size", type=int, default=0, help="training batch (default 8; 4 with --quick)")
    s.add_argument("--images", type=int, default=0, help="synthetic images (default 64; 16 with --quick)")
    s.add_argument("--new-tokens", type=int, default=0, help="generated tokens (default 32; 4 with --quick)")
    s.add_argument("--vision", default="", help="vision tower (default clip-vit-b32; tiny-clip with --quick)")
    s.add_argument("--lm", default="", help="LM (default smollm2-135m; tiny-llama with --quick); its LM head "
                                            "must have no bias (the Llava reference has none)")
    s.add_argument("--workdir", default="", help="keep the synthetic data and caches here (default: a temp folder)")
    s.add_argument("--profile", default="", help="also write torch.profiler tables of one step of each contender here")
    s.add_argument("--compile", action="store_true", help="phivlm's training steps with --compile, as `phivlm "
                                                          "pretrain --compile` runs them (compiled before timing)")
    s.set_defaults(func=c.cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phivlm", description="Train and serve small LLaVA-style VLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of system errors")
    sub = p.add_subparsers(dest="command", required=True)

    data = command(sub, "data", "datasets").add_subparsers(dest="data_command", required=True)
    s = command(data, "synth", "write the synthetic shapes dataset (COCO + LLaVA formats, held-out Q&A)")
    s.add_argument("--out", default="data/synth", help="folder for the dataset (default: data/synth)")
    s.add_argument("--train", type=int, default=2000, help="training images (default: 2000)")
    s.add_argument("--val", type=int, default=200, help="held-out images (default: 200)")
    s.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes (default: 0)")
    s.set_defaults(func=c.cmd_synth)

    add_training_commands(sub)
    add_inference_commands(sub)
    add_demo_and_bench(sub)
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except PhivlmError as e:
        print(f"phivlm: {'stopped' if e.exit_code == 130 else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("phivlm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # unexpected system errors (e.g. disk full): one line; -v shows the traceback
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"phivlm: error: {where}{e.strerror or e} (run with -v for the traceback)", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun: leave the process group before exit (gloo's threads torn down at interpreter exit instead
    can abort a finished run: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
