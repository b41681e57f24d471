"""``phivlm demo``: synthetic data -> features -> stage 1 -> stage 2 -> ``phivlm eval`` on held-out questions
(with the blind and shuffled-image baselines) -> report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import RunConfig
from .data.synth import synthesize
from .evaluate.run import evaluate
from .train.loop import train

log = logging.getLogger(__name__)
EVAL_IMAGES = 60  # held-out images asked every question about them (~7 each), under 3 conditions

# (vision, lm, train images, stage-1 steps, stage-2 steps, batch, stage-2 lr)
PRESETS = {
    "default": ("clip-vit-b32", "smollm2-135m", 2000, 100, 80, 16, 1e-3),
    "tiny": ("tiny-clip", "tiny-llama", 300, 40, 120, 16, 3e-3),
}


def stage_configs(out: Path, data: dict, preset: str) -> tuple[RunConfig, RunConfig]:
    vision, lm, _, s1_steps, s2_steps, batch, s2_lr = PRESETS[preset]
    s1 = RunConfig()
    s1.model.vision, s1.model.lm = vision, lm
    s1.data.data, s1.data.images, s1.data.template = data["captions_train"], data["images"], "plain"
    s1.data.features = str(out / "features")
    s1.train.output, s1.train.max_steps, s1.train.batch_size, s1.train.lr = str(out / "stage1"), s1_steps, batch, 1e-3
    s2 = RunConfig.from_dict(s1.to_dict())
    s2.data.data, s2.data.template, s2.data.val_data = data["instruct_train"], "auto", data["instruct_val"]
    s2.train.eval_every = max(1, s2_steps // 6)
    s2.tuning.lm_tuning = "lora"
    s2.train.output, s2.train.max_steps, s2.train.lr, s2.train.lm_lr = str(out / "stage2"), s2_steps, s2_lr, s2_lr
    if preset == "tiny":
        s2.tuning.lm_tuning = "full"
    return s1, s2


def print_examples(predictions: Path, per_type: int = 2) -> None:
    """A few held-out questions of each type: the expected answer, the model's, and with a shuffled image."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    shown: dict[str, int] = {}
    print(f"\n{'question':<44}{'expected':>14}{'model':>14}{'shuffled':>14}")
    for r in rows:
        if shown.get(r["type"], 0) < per_type:
            shown[r["type"]] = shown.get(r["type"], 0) + 1
            print(f"{r['prompt'][:43]:<44}{r['refs'][0]:>14}{r['model'][:13]:>14}{r.get('shuffled', '')[:13]:>14}")


def run_demo(args) -> int:
    out = Path(args.out)
    preset = "tiny" if args.tiny else "default"
    t0 = time.time()
    # 4-8 questions per conversation: more answers per token of image and system prompt than 2-4
    data = synthesize(out / "data", n_train=PRESETS[preset][2], n_val=200 if preset == "default" else 40,
                      turns=(4, 8))
    s1, s2 = stage_configs(out, data, preset)
    ckpt1 = train(s1)
    ckpt2 = train(s2, init=ckpt1)
    report, metrics = evaluate(ckpt2, [data["qa_val"]], data["images"], out / "eval", limit=EVAL_IMAGES,
                               device=s2.train.device)
    qa = metrics["tasks"]["qa"]
    acc = {c: s["vqa_accuracy"] for c, s in qa["scores"].items()}
    print(f"\nHeld-out questions ({qa['n']}), VQAv2 accuracy; baselines: image features zeroed (blind) or "
          f"another image's (shuffled):")
    print(f"{'type':<10}" + "".join(f"{c:>10}" for c in acc))
    for k in acc["model"]:
        print(f"{k:<10}" + "".join(f"{acc[c][k]:>10.1%}" for c in acc))
    print_examples(Path(report).parent / "predictions.jsonl")
    result = {"vqa_accuracy": acc, "n_questions": qa["n"], "seconds": round(time.time() - t0, 1),
              "checkpoint": str(ckpt2), "report": str(report)}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    image = Path(data["images"]) / json.loads(Path(data["qa_val"]).read_text().splitlines()[0])["image"]
    print(f"\ndemo finished in {result['seconds']:.0f} s; report: {report}\ntry:\n"
          f"  phivlm chat --checkpoint {ckpt2} --image {image}")
    return 0
