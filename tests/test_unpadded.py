"""Unpadded training (models.unpadded) computes the padded batch's loss and gradients, for Llama and Phi LMs,
with LoRA; without rows it is eager attention; training switches it on, and nothing of it is saved."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from phivlm.bench.measure import MatmulFlops
from phivlm.config import TuningConfig
from phivlm.loading.tuning import apply_tuning
from phivlm.models import unpadded
from phivlm.models.lm import load_lm
from phivlm.models.vlm import IMAGE_ID, PhiVLM
from phivlm.runtime import autocast

CPU = torch.device("cpu")


def _pair(lm_name: str, tuning: str) -> tuple[PhiVLM, PhiVLM]:
    torch.manual_seed(0)
    lm = apply_tuning(load_lm(lm_name, attention="eager"), TuningConfig(lm_tuning=tuning, lora_dropout=0.0))
    padded = PhiVLM(lm, 8, 4).train()
    for name, p in padded.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    packed = copy.deepcopy(padded)
    assert unpadded.supports(packed.base_lm)
    unpadded.use(packed.base_lm)
    return padded, packed


def _batch() -> dict:
    """Three right-padded rows of different lengths (5 and 2 padding tokens, one full row)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 14), generator=g)
    ids[:, 1:5] = IMAGE_ID
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 12:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "image_features": torch.randn(3, 4, 8, generator=g)}


def _loss_and_grads(vlm: PhiVLM, precision: str) -> tuple[float, dict]:
    vlm.zero_grad()
    with autocast(CPU, precision):
        loss = vlm(**_batch())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lm_name,tuning", [("tiny-llama", "lora"), ("tiny-phi", "lora"), ("tiny-llama", "full")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 4])  # 1: real tokens only; 4: 35 real rounded up with 1 padding position
def test_unpadded_training_equals_padded(lm_name, tuning, precision, rows, monkeypatch):
    monkeypatch.setattr(unpadded, "ROWS", rows)
    padded, packed = _pair(lm_name, tuning)
    loss_a, grads_a = _loss_and_grads(padded, precision)
    loss_b, grads_b = _loss_and_grads(packed, precision)
    tol = 1e-6 if precision == "fp32" else 1e-2
    assert loss_b == pytest.approx(loss_a, rel=tol, abs=tol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=name)


def test_without_rows_it_is_eager_attention():
    padded, packed = _pair("tiny-llama", "frozen")
    b = _batch()
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        a, _ = padded.eval().prefill(ids, mask, b["image_features"])
        c, _ = packed.eval().prefill(ids, mask, b["image_features"])
    torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_flop_count_sees_the_padded_attention_and_the_real_tokens(monkeypatch):
    monkeypatch.setattr(unpadded, "ROWS", 1)
    padded, packed = _pair("tiny-llama", "frozen")
    counts = []
    for vlm in (padded, packed):
        with MatmulFlops(vlm) as count, autocast(CPU, "fp32"):
            vlm(**_batch())
        counts.append(count)
    cfg = padded.base_lm.config
    n_real, n_all = int(_batch()["attention_mask"].sum()), 3 * 14
    per_token = 2 * cfg.num_hidden_layers * sum(
        m.in_features * m.out_features for m in padded.base_lm.model.layers[0].modules()
        if isinstance(m, torch.nn.Linear))
    assert counts[0].forward - counts[1].forward == (n_all - n_real) * per_token


def test_training_switches_it_on_and_saves_nothing_of_it(synth_data, train_run, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", synth_data["captions_train"], synth_data["images"], tmp_path / "features",
                      lm="tiny-llama", max_steps=2)
    cfg.tuning.lm_tuning = "full"
    run = train_run(cfg)
    assert unpadded.active(run.vlm.base_lm)
    saved = json.loads((run.ckpt / "lm" / "config.json").read_text())
    assert unpadded.NAME not in json.dumps(saved)
