"""``--compile``: the LM's decoder layers through torch.compile give eager's loss and gradients, keep the checkpoint
format, and fail clearly where they cannot run."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from phivlm.config import RunConfig
from phivlm.errors import PhivlmError
from phivlm.models.lm import load_lm
from phivlm.models.vlm import IMAGE_ID
from phivlm.train.compiling import compile_layers, cpu_compiler
from test_frozen_weights import _vlm

CPU = torch.device("cpu")


def _padded_batch(rows: int, length: int, seed: int) -> dict:
    """Right-padded rows of different lengths: the unpadded (packed) path, as training runs it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, length), generator=g)
    ids[:, :4] = IMAGE_ID
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, length - 2 * r:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "image_features": torch.randn(rows, 4, 8, generator=g)}


def _compiled(module) -> bool:
    """Whether ``module.compile()`` wrapped its forward (torch keeps the compiled call here)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _loss_and_grads(vlm, batch) -> tuple[torch.Tensor, dict]:
    vlm.zero_grad(set_to_none=True)
    loss = vlm(**batch)  # fp32: the comparison is of the fusion, not of bf16 rounding
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}


def test_compiled_layers_give_eager_loss_and_gradients_at_every_shape():
    eager = _vlm("lora")
    eager.prepare_training(None)
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled.base_lm, CPU) == compiled.base_lm.config.num_hidden_layers
    assert all(_compiled(layer) for layer in compiled.base_lm.model.layers)
    assert not any(_compiled(layer) for layer in eager.base_lm.model.layers)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their format
    for batch in (_padded_batch(3, 14, 1), _padded_batch(2, 21, 2)):  # a new shape: dynamic, not a wrong reuse
        loss_a, grads_a = _loss_and_grads(eager, batch)
        loss_b, grads_b = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_needs_a_cpu_compiler(monkeypatch):
    lm = load_lm("tiny-llama")
    with pytest.raises(PhivlmError, match="C\\+\\+ compiler"):
        compile_layers(lm, CPU, which=lambda name: None)
    monkeypatch.setenv("CXX", "my-c++")
    assert cpu_compiler(lambda name: f"/opt/bin/{name}" if name == "my-c++" else None) == "/opt/bin/my-c++"
    monkeypatch.delenv("CXX")
    assert cpu_compiler(lambda name: "/usr/bin/g++" if name == "g++" else None) == "/usr/bin/g++"


def test_compile_finds_the_layers_or_says_it_cannot():
    with pytest.raises(PhivlmError, match="decoder layers of Linear"):
        compile_layers(torch.nn.Linear(2, 2), CPU, which=lambda name: "/usr/bin/g++")


@pytest.mark.parametrize("change", [("train", "fsdp", "full"), ("tuning", "lm_tuning", "qlora"),
                                    ("train", "objective", "mixed"), ("tuning", "gradient_checkpointing", True)])
def test_compile_refuses_unchecked_combinations(change):
    cfg = RunConfig()
    cfg.train.compile = True
    cfg.validate()
    section, field, value = change
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(PhivlmError, match="--compile"):
        cfg.validate()


def test_a_run_resumes_with_or_without_compile():
    from phivlm.train.state import fingerprint

    cfg = RunConfig()
    before = fingerprint(cfg, None)
    cfg.train.compile = True  # how the steps run, not what they compute
    assert fingerprint(cfg, None) == before
    cfg.train.lr *= 2
    assert fingerprint(cfg, None) != before


def test_training_with_compile_logs_eager_losses(synth_data, tiny_config, train_run, tmp_path):
    """The real command path: ``train`` with ``compile`` on logs the losses of the same run without it."""
    features = tmp_path / "features"
    runs = {}
    for flag in (False, True):
        cfg = tiny_config(tmp_path / f"compile-{flag}", synth_data["captions_train"], synth_data["images"],
                          features, lm="tiny-llama", compile=flag)
        run = train_run(cfg)
        assert all(_compiled(layer) for layer in run.vlm.base_lm.model.layers) == flag  # the flag reaches train()
        log = (run.ckpt.parent / "log.jsonl").read_text().splitlines()
        runs[flag] = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    assert len(runs[True]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)

