"""The ``phivlm`` command line: one subcommand per job, each with ``--help``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ModelConfig, RunConfig, add_config_args, config_from_args
from .registry import PhivlmError

log = logging.getLogger("phivlm")


def pretrain_defaults() -> RunConfig:
    cfg = RunConfig()
    cfg.train.output, cfg.data.template, cfg.tuning.lm_tuning = "runs/stage1", "plain", "frozen"
    return cfg


def finetune_defaults() -> RunConfig:
    cfg = RunConfig()
    cfg.train.output, cfg.data.template, cfg.tuning.lm_tuning = "runs/stage2", "auto", "lora"
    cfg.train.lr, cfg.train.lm_lr = 2e-4, 2e-4
    return cfg


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--seed", type=int, default=0)


def generation_config(args):
    from .generate import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)


# -- commands ------------------------------------------------------------------------------------

def cmd_synth(args) -> int:
    from .data.synth import synthesize

    summary = synthesize(args.out, args.train, args.val, args.seed)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_features(args) -> int:
    from .data.features import build_features
    from .data.sources import load_samples
    from .models.vision import VisionTower
    from .runtime import pick_device

    tower = VisionTower(args.vision, args.feature_layer, image_size=args.image_size, image_tokens=args.image_tokens)
    names: list[str] = []
    for path in args.data:
        names += [s.image for s in load_samples(path, args.limit, args.seed, skip_bad=True)]
    store, bad = build_features(tower, args.images, names, args.features, args.batch_size, args.workers,
                                device=pick_device(args.device), precision=args.precision)
    print(f"{len(store)} images cached in {store.folder} ({len(bad)} bad images skipped)")
    for b in bad:
        print(f"skipped {b['image']}: {b['reason']}", file=sys.stderr)
    return 0


def add_trust_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint that asks for trust_remote_code to run its LM's own Python code")


def launch_torchrun(args, defaults: RunConfig) -> None:
    """``--nproc N``: re-run this very command under torchrun with N processes on this machine."""
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.fsdp import check

        check(config_from_args(args, defaults))  # a refused --fsdp combination: one message, not one per process
        argv = sys.argv[1:]
        i = next(i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc="))
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "phivlm.cli", *argv]
        log.info("launching: %s", " ".join(cmd))
        os.execv(sys.executable, cmd)


def cmd_pretrain(args) -> int:
    launch_torchrun(args, pretrain_defaults())  # before the heavy imports: under --nproc this process re-executes
    from .train.loop import train

    cfg = config_from_args(args, pretrain_defaults())
    train(cfg)
    return 0


def cmd_finetune(args) -> int:
    launch_torchrun(args, finetune_defaults())
    from .train.checkpoint import checkpoint_config, merge_checkpoint, resolve_checkpoint
    from .train.loop import train

    init = resolve_checkpoint(args.checkpoint)
    base = finetune_defaults()
    base.model = checkpoint_config(init, bool(getattr(args, "model.trust_remote_code", None))).model
    cfg = config_from_args(args, finetune_defaults(), base=base)
    for key in ("vision", "lm"):
        if getattr(cfg.model, key) != getattr(base.model, key):
            log.warning("%s was trained with --%s %s, this run uses %s: its projector fits the models it was "
                        "trained with", init, key, getattr(base.model, key), getattr(cfg.model, key))
    ckpt = train(cfg, init=init)
    if args.merge and int(os.environ.get("RANK", "0")) == 0:
        merged = merge_checkpoint(ckpt, Path(cfg.train.output) / "merged")
        print(f"merged model written to {merged}")
    return 0


def cmd_merge(args) -> int:
    from .train.checkpoint import merge_checkpoint

    print(f"merged model written to {merge_checkpoint(args.checkpoint, args.out, args.trust_remote_code)}")
    return 0


def cmd_caption(args) -> int:
    from .infer import Assistant, caption

    assistant = Assistant(args.checkpoint, args.device, trust_remote_code=args.trust_remote_code)
    for path, text in zip(args.image, caption(assistant, args.image, generation_config(args))):
        print(f"{path}: {text}")
    return 0


def cmd_chat(args) -> int:
    from .infer import Assistant, load_image

    assistant = Assistant(args.checkpoint, args.device, trust_remote_code=args.trust_remote_code)
    features = assistant.features([load_image(args.image)])  # once for the whole conversation
    gen = generation_config(args)
    turns: list[tuple[str, str]] = []
    print(f"chatting about {args.image} (empty line or Ctrl-D to quit)")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            asking = ("user", assistant.first_turn(question) if not turns else question)
            asked, dropped = assistant.fit(turns + [asking], gen.max_new_tokens)
        except PhivlmError as e:
            print(f"error: {e}")
            continue
        if dropped:
            print(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} no longer fit the model's context "
                  f"of {assistant.context} tokens and are left out)")
        text = ""
        print("model> ", end="", flush=True)
        for text_so_far in assistant.stream(None, asked, gen, args.seed, features=features):
            print(text_so_far[len(text):], end="", flush=True)
            text = text_so_far
        print()
        turns = asked + [("assistant", text)]
    return 0


def cmd_generate(args) -> int:
    from .data.images import image_path
    from .infer import Assistant, load_image

    assistant = Assistant(args.checkpoint, args.device, trust_remote_code=args.trust_remote_code)
    rows = []
    for i, line in enumerate(Path(args.input).read_text().splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append((row, row["image"], str(row["prompt"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PhivlmError(f"{args.input}: line {i + 1}: expected JSON with 'image' and 'prompt'") from None
            try:  # before any work: a prompt the model cannot take is refused, naming its line
                assistant.fit([("user", assistant.first_turn(rows[-1][2]))], args.max_new_tokens)
            except PhivlmError as e:
                raise PhivlmError(f"{args.input}: line {i + 1}: {e}") from None
    gen = generation_config(args)
    with open(args.output, "w") as out:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            images = [load_image(image_path(args.images, img) if args.images else img) for _, img, _ in chunk]
            convs = [[("user", assistant.first_turn(p))] for _, _, p in chunk]
            for (row, _, _), answer in zip(chunk, assistant.answer(images, convs, gen, args.seed)):
                out.write(json.dumps({**row, "answer": answer}) + "\n")
    print(f"{len(rows)} answers written to {args.output}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.out, args.format, args.dtype, args.metrics)
    print(f"exported model written to {out}")
    return 0


def cmd_serve(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise PhivlmError("the web demo needs gradio: pip install -e '.[serve]'")
    from .serve import serve

    serve(args.checkpoint, generation_config(args), args.host, args.port, args.share, args.concurrency,
          args.device, args.seed, args.trust_remote_code)
    return 0


def cmd_eval(args) -> int:
    from .evaluate.run import evaluate, summary

    data = [args.data] + ([args.captions] if args.captions else [])
    baselines = [] if args.no_baselines else [b.strip() for b in args.baselines.split(",") if b.strip()]
    report, metrics = evaluate(args.checkpoint, data, args.images, args.out, args.limit, args.batch_size,
                               baselines, args.device, trust_remote_code=args.trust_remote_code)
    print(f"{summary(metrics)}\nreport: {report}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from .bench import BenchConfig, run_bench, summary

    cfg = BenchConfig(quick=args.quick, vision=args.vision, lm=args.lm, batch_size=args.batch_size,
                      batches=args.batches, rounds=args.rounds, images=args.images, new_tokens=args.new_tokens,
                      threads=args.threads, figures=args.figures, workdir=args.workdir, profile=args.profile)
    res = run_bench(cfg, args.out)
    print(summary(res))
    if args.out:
        print(f"results written to {args.out}")
    return 0


# -- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phivlm", description="Train and serve small LLaVA-style VLMs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the synthetic shapes dataset (COCO + LLaVA formats)")
    s.add_argument("--out", default="data/synth")
    s.add_argument("--train", type=int, default=2000, help="training images")
    s.add_argument("--val", type=int, default=200, help="held-out images")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("features", help="encode images once with the frozen vision tower into the cache")
    s.add_argument("--vision", default=ModelConfig.vision)
    s.add_argument("--feature-layer", type=int, default=ModelConfig.feature_layer)
    s.add_argument("--image-size", type=int, default=0, help="pixels the tower sees (0 = its own)")
    s.add_argument("--image-tokens", type=int, default=0, help="patch grid pooled to this many tokens (0 = all)")
    s.add_argument("--data", nargs="+", required=True, help="COCO or LLaVA annotation file(s)")
    s.add_argument("--images", required=True)
    s.add_argument("--features", default=".cache/features")
    s.add_argument("--limit", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="auto", help="auto (bf16 where the hardware has it) | bf16 | fp32")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("pretrain", help="stage 1: train the projector on image captions")
    s.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun)")
    add_config_args(s, pretrain_defaults())
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("finetune", help="stage 2: instruction finetuning (LoRA, QLoRA, full)")
    s.add_argument("--checkpoint", required=True, help="stage-1 (or earlier stage-2) checkpoint")
    s.add_argument("--merge", action="store_true", help="also write a merged standalone model")
    s.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun)")
    add_config_args(s, finetune_defaults())
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("merge", help="merge a LoRA/QLoRA checkpoint into a standalone one")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    add_trust_flag(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("caption", help="caption images with a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", nargs="+", required=True)
    add_generation_args(s)
    add_trust_flag(s)
    s.set_defaults(func=cmd_caption)

    s = sub.add_parser("chat", help="interactive multi-turn chat about an image")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", required=True)
    add_generation_args(s)
    add_trust_flag(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("generate", help="batch answers for a JSONL of {image, prompt}")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--images", default="", help="folder the 'image' paths are relative to")
    s.add_argument("--batch-size", type=int, default=8)
    add_generation_args(s)
    add_trust_flag(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder (LoRA merged)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--format", default="auto", choices=["auto", "llava", "phivlm"],
                   help="llava: LlavaForConditionalGeneration (linear / mlp2x_gelu projectors); phivlm: phivlm's "
                        "own model class (any projector; needs `import phivlm`); auto: llava where exact")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype on disk")
    s.add_argument("--metrics", help="phivlm eval's metrics.json for the model card (default: the checkpoint's "
                                     "run folder, or an eval folder beside it that names this checkpoint)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="web demo (Gradio): upload an image and chat about it")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = every interface)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    s.add_argument("--concurrency", type=int, default=1, help="requests answered at once; the rest queue")
    add_generation_args(s)
    add_trust_flag(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("eval", help="score a checkpoint on held-out Q&A and/or captions, with grounding baselines")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True, help="COCO captions JSON, LLaVA conversations JSON, or JSONL of "
                                                 "{image, question, answer[, type]}")
    s.add_argument("--images", required=True, help="image folder")
    s.add_argument("--captions", help="also caption the images of this COCO captions file")
    s.add_argument("--out", default="runs/eval", help="folder for metrics.json, report.md and thumbnails")
    s.add_argument("--limit", type=int, default=0, help="first N images of each file (0 = all)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--baselines", default="blind,shuffled",
                   help="grounding baselines, comma-separated: blind (image features zeroed), "
                        "shuffled (another image's)")
    s.add_argument("--no-baselines", action="store_true", help="skip the grounding baselines")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_trust_flag(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("demo", help="end to end: synth data, stage 1, stage 2, held-out accuracy")
    s.add_argument("--out", default="runs/demo")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random models (seconds, for tests)")
    size.add_argument("--long", action="store_true", help="more training steps for a stronger result (~3x the time)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="speed and memory against the transformers Llava reference (see BENCHMARKS.md)")
    s.add_argument("--quick", action="store_true", help="tiny models, a smoke run of seconds")
    s.add_argument("--out", help="write every figure to this JSON file")
    s.add_argument("--figures", default="stage1,stage2,features,generation", help="comma-separated subset")
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
    s.set_defaults(func=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
