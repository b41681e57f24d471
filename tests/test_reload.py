"""Checkpoints reload in a fresh process and answer exactly as the model that training left in memory.

The checkpoints come from the learnability run (conftest ``learned``: stage 1 frozen, stage 2 full
tuning; fp32, so both sides compute in fp32) and a LoRA run continued from its full checkpoint.
The CLI runs in a subprocess (``python -m phivlm.cli``); the reference answers come from the
in-memory model of the training run and from an in-process ``Assistant``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import first_logits, run_cli
from phivlm.config import RunConfig
from phivlm.data.synth import COLORS
from phivlm.generate import GenerationConfig
from phivlm.infer import Assistant, caption, load_image
from phivlm.evaluate.run import read_task

pytestmark = pytest.mark.slow  # the ``learned`` fixture (a 310-step training, ~30 s); CLI runs of 6-8 s each
GEN = GenerationConfig(max_new_tokens=8)


def _in_memory(run) -> Assistant:
    """An Assistant whose model is the very object training left in memory (not reloaded)."""
    a = Assistant(run.ckpt, "cpu")
    a.loaded.vlm = run.vlm.eval()
    return a


@pytest.fixture(scope="module")
def lora_run(learned, train_run, tmp_path_factory):
    """LoRA stage 2 continued from the learned full checkpoint (its LM, in ``lm/``, is the base)."""
    full = learned["stage2"]
    root = tmp_path_factory.mktemp("lora-on-full")
    cfg = RunConfig.load(full.ckpt / "config.yaml")
    cfg.tuning.lm_tuning, cfg.tuning.lora_dropout = "lora", 0.0
    cfg.train.output, cfg.train.max_steps, cfg.train.lr, cfg.train.lm_lr = str(root / "run"), 5, 1e-3, 1e-2
    return train_run(cfg, init=full.ckpt)


@pytest.fixture(scope="module")
def questions(learned) -> list[dict]:
    data = learned["data"]
    items = [it for it in read_task(data["qa_val"])[1] if it.type == "color"][:8]
    return [{"image": it.image, "prompt": it.prompt} for it in items]


@pytest.mark.parametrize("which", ["full", "lora"])
def test_generate_in_fresh_process(learned, lora_run, questions, tmp_path, which):
    run = learned["stage2"] if which == "full" else lora_run
    images = learned["data"]["images"]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(q) + "\n" for q in questions))
    run_cli("generate", "--checkpoint", str(run.ckpt), "--input", str(src), "--output", str(out), "--images", images,
            "--device", "cpu", "--batch-size", str(len(questions)), "--max-new-tokens", str(GEN.max_new_tokens))
    fresh = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("image", "prompt")} for r in fresh] == questions
    fresh_answers = [r["answer"] for r in fresh]

    pics = [load_image(Path(images) / q["image"]) for q in questions]
    for a in (_in_memory(run), Assistant(run.ckpt, "cpu")):
        assert a.precision == "fp32"
        convs = [[("user", a.first_turn(q["prompt"]))] for q in questions]
        assert a.answer(pics, convs, GEN) == fresh_answers
    assert sum(ans in COLORS for ans in fresh_answers) >= len(questions) // 2, fresh_answers  # a real model


def test_lora_checkpoint_restores_adapter_and_base(learned, lora_run, questions):
    """Reloaded LoRA-on-full model = the in-memory one, and measurably not its full-tuned base alone."""
    image = load_image(Path(learned["data"]["images"]) / questions[0]["image"])
    logits = {name: first_logits(a, image, questions[0]["prompt"]) for name, a in (
        ("memory", _in_memory(lora_run)), ("reloaded", Assistant(lora_run.ckpt, "cpu")),
        ("base", Assistant(learned["stage2"].ckpt, "cpu")))}
    torch.testing.assert_close(logits["reloaded"], logits["memory"], rtol=0, atol=1e-5)
    assert (logits["reloaded"] - logits["base"]).abs().max() > 1e-3


def test_chat_in_fresh_process(learned):
    run = learned["stage2"]
    first = read_task(learned["data"]["qa_val"])[1][0]
    image = Path(learned["data"]["images"]) / first.image
    q1, q2 = "What color is the circle?", "What color is the square?"
    out = run_cli("chat", "--checkpoint", str(run.ckpt), "--image", str(image), "--device", "cpu",
                  "--max-new-tokens", str(GEN.max_new_tokens), stdin=f"{q1}\n{q2}\n\n").stdout
    said = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]

    a = _in_memory(run)
    pic = load_image(image)
    turns = [("user", a.first_turn(q1))]
    first = a.answer([pic], [turns], GEN)[0]
    second = a.answer([pic], [turns + [("assistant", first), ("user", q2)]], GEN)[0]
    assert said == [first, second]
    assert first in COLORS, first


def test_caption_stage1_checkpoint(learned):
    run = learned["stage1"]
    names = sorted({it.image for it in read_task(learned["data"]["qa_val"])[1]})[:2]
    images = [str(Path(learned["data"]["images"]) / n) for n in names]
    out = run_cli("caption", "--checkpoint", str(run.ckpt), "--image", *images, "--device", "cpu",
                  "--max-new-tokens", "12").stdout
    lines = out.splitlines()
    expected = caption(_in_memory(run), images, GenerationConfig(max_new_tokens=12))
    assert lines == [f"{p}: {t}" for p, t in zip(images, expected)]
