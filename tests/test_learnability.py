"""Learnability: tiny models trained through the real pipeline answer held-out colour questions from the image.

The session fixture ``learned`` (conftest.py) trains tiny-clip + tiny-llama (fp32, seed 0): stage 1
(10 steps, projector only, LM frozen) on the synthetic COCO captions, then stage 2 (300 steps of 32,
full LM tuning, ``auto`` template = the tokenizer's ChatML) on the colour turns of the synthetic
LLaVA conversations. The model must beat itself asked about a *different* image (the shuffled-image
baseline) by a wide margin, so its answers come from the pixels, not from question priors.

Why this recipe (measured; the same thresholds pass with seeds 0-3):
- The random tiny-clip tower keeps colour (an attention probe on its features reads the largest
  object's colour 75% right, chance 17%) but hardly shape (42%, chance 33%). "What color is the
  circle?" is thus answerable from colour alone only with one object in the image; with 2-3 objects
  naming a colour present is right 1/2 or 1/3 of the time (about 50% over all colour questions).
- With every question type mixed in, 300 steps leave the model blind (it learns the answer format and
  the most frequent answers first); colour turns alone get it to use the image within the budget.
- The stage-1 LM is random and frozen, so stage 1 can only learn an image-independent soft prompt:
  after 20 steps of it, seed 1 stayed blind through stage 2 (200 steps of 32, or 400 of 16, or 600 of 8);
  after 0 or 5 steps it learned. It is kept short.
"""
from __future__ import annotations

import json

import pytest

from helpers import log_records
from phivlm.evaluate.vqa import normalize_answer, vqa_accuracy

pytestmark = pytest.mark.slow  # the ``learned`` fixture: a 310-step training and an eval, ~30 s


def test_colour_answers_come_from_the_image(learned, learned_eval):
    """Scored by ``phivlm eval`` (conftest ``learned_eval``: the held-out colour questions, VQAv2 scoring,
    the shuffled-image baseline giving each image another image's features)."""
    data, preds = learned["data"], learned_eval["predictions"]
    scores = learned_eval["metrics"]["tasks"]["qa"]["scores"]
    acc, acc_shuffled = (scores[c]["vqa_accuracy"]["color"] for c in ("model", "shuffled"))

    n_objects = {im["file_name"]: len(im["objects"]) for im in json.loads(open(data["captions_val"]).read())["images"]}
    single = [p for p in preds if n_objects[p["image"]] == 1]
    acc_single, acc_single_shuffled = (sum(vqa_accuracy(p[c], p["refs"]) for p in single) / len(single)
                                       for c in ("model", "shuffled"))
    report = (f"colour {acc:.2f} (shuffled images {acc_shuffled:.2f}); one-object images {acc_single:.2f} "
              f"(shuffled {acc_single_shuffled:.2f}, n={len(single)}); {len(preds)} questions")
    print(report)  # shown with pytest -rP

    assert len(preds) >= 150 and len(single) >= 15, report
    assert all(p["type"] == "color" for p in preds), report
    assert len({normalize_answer(p["model"]) for p in preds}) >= 4, f"answers hardly vary: {report}"  # not one guess
    assert acc >= 0.35, report  # chance is 1/6; naming a colour present in the image gives ~0.5
    assert acc - acc_shuffled >= 0.20, report
    assert acc_single >= 0.75 and acc_single - acc_single_shuffled >= 0.5, report


def test_training_loss_beats_a_blind_model(learned):
    """The stage-2 run went its full length and its loss fell below what a model ignoring the image can
    reach (about 0.37 per token here: the colour's first character carries log 6 nats, the rest and EOS ~0)."""
    from phivlm.config import RunConfig

    ckpt = learned["stage2"].ckpt
    cfg = RunConfig.load(ckpt / "config.yaml")
    log = log_records(ckpt.parent)
    assert log[-1]["step"] == cfg.train.max_steps == json.loads((ckpt / "state.json").read_text())["step"]
    assert cfg.tuning.lm_tuning == "full" and cfg.data.template == "chat"  # auto resolved to ChatML
    final = sum(r["loss"] for r in log[-4:]) / 4
    assert final < 0.3, [round(r["loss"], 3) for r in log]
