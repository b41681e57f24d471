"""``phivlm demo``: synthetic data -> features -> stage 1 -> stage 2 -> held-out accuracy vs shuffled images."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import RunConfig
from .data.synth import synthesize
from .infer import Assistant
from .qa import accuracy, answer_rows, read_qa, shuffled_images
from .train.loop import train

log = logging.getLogger(__name__)

# (vision, lm, train images, stage-1 steps, stage-2 steps, batch, stage-2 lr)
PRESETS = {
    "default": ("clip-vit-b32", "smollm2-135m", 2000, 150, 450, 16, 5e-4),
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
    s2.data.data, s2.data.template = data["instruct_train"], "auto"
    s2.tuning.lm_tuning = "lora"
    s2.train.output, s2.train.max_steps, s2.train.lr, s2.train.lm_lr = str(out / "stage2"), s2_steps, s2_lr, s2_lr
    if preset == "tiny":
        s2.tuning.lm_tuning = "full"
    return s1, s2


def run_demo(args) -> int:
    out = Path(args.out)
    preset = "tiny" if args.tiny else "default"
    t0 = time.time()
    data = synthesize(out / "data", n_train=PRESETS[preset][2], n_val=200 if preset == "default" else 40)
    s1, s2 = stage_configs(out, data, preset)
    ckpt1 = train(s1)
    ckpt2 = train(s2, init=ckpt1)
    assistant = Assistant(ckpt2, s2.train.device)
    rows = [r for r in read_qa(data["qa_val"]) if r["type"] != "position"] if preset == "default" else read_qa(
        data["qa_val"])
    preds = answer_rows(assistant, rows, data["images"], desc="held-out")
    shuffled = answer_rows(assistant, rows, data["images"], images=shuffled_images(rows), desc="shuffled")
    acc, acc_shuf = accuracy(rows, preds), accuracy(rows, shuffled)
    print("\nHeld-out questions (expected -> model):")
    for r, p in list(zip(rows, preds))[:8]:
        print(f"  {r['image']}  {r['question']:<40} {r['answer']:>8} -> {p}")
    print(f"\n{'type':<10} {'accuracy':>9} {'shuffled images':>16}")
    for k in acc:
        print(f"{k:<10} {acc[k]:>9.1%} {acc_shuf[k]:>16.1%}")
    result = {"accuracy": acc, "shuffled_accuracy": acc_shuf, "n_questions": len(rows),
              "seconds": round(time.time() - t0, 1), "checkpoint": str(ckpt2)}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    print(f"\ndemo finished in {result['seconds']:.0f} s; checkpoint {ckpt2}; try:\n"
          f"  phivlm chat --checkpoint {ckpt2} --image {Path(data['images']) / rows[0]['image']}")
    return 0
