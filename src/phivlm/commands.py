"""What each ``phivlm`` subcommand does (the parser that reaches them is in ``cli``); heavy imports inside each."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .config import RunConfig, config_from_args, stage_defaults
from .errors import PhivlmError

log = logging.getLogger("phivlm")


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
    from .models.vision import build_tower
    from .runtime import pick_device

    cfg = config_from_args(args, RunConfig())
    m, d, t = cfg.model, cfg.data, cfg.train
    if not d.images:
        raise PhivlmError("features: --images is required (the image folder)")
    tower = build_tower(m)
    names: list[str] = []
    for path in args.data:
        names += [s.image for s in load_samples(path, d.limit, t.seed, skip_bad=True)]
    store, bad = build_features(tower, d.images, names, d.features, args.batch_size, t.workers,
                                device=pick_device(t.device), precision=t.precision)
    print(f"{len(store)} images cached in {store.folder} ({len(bad)} bad images skipped)")
    for b in bad:
        print(f"skipped {b['image']}: {b['reason']}", file=sys.stderr)
    return 0


def launch_torchrun(args, defaults: RunConfig) -> None:
    """``--nproc N``: re-run this very command under torchrun with N processes on this machine."""
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        config_from_args(args, defaults).validate()  # e.g. a refused --fsdp combination: one message, not N
        argv = sys.argv[1:]
        i = next(i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc="))
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "phivlm.cli", *argv]
        log.info("launching: %s", " ".join(cmd))
        os.execv(sys.executable, cmd)


def cmd_pretrain(args) -> int:
    launch_torchrun(args, stage_defaults("pretrain"))  # before the heavy imports: under --nproc it re-executes
    from .train.loop import train

    cfg = config_from_args(args, stage_defaults("pretrain"))
    train(cfg)
    return 0


def cmd_finetune(args) -> int:
    launch_torchrun(args, stage_defaults("finetune"))
    from .loading.checkpoint import checkpoint_config, resolve_checkpoint
    from .train.checkpoint import merge_checkpoint
    from .train.loop import train

    init = resolve_checkpoint(args.checkpoint)
    base = stage_defaults("finetune")
    base.model = checkpoint_config(init, bool(getattr(args, "model.trust_remote_code", None))).model
    cfg = config_from_args(args, stage_defaults("finetune"), base=base)
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
                      threads=args.threads, figures=args.figures, workdir=args.workdir, profile=args.profile,
                      compile=args.compile)
    res = run_bench(cfg, args.out)
    print(summary(res))
    if args.out:
        print(f"results written to {args.out}")
    return 0
