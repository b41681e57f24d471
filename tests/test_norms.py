"""Training runs the LM's RMSNorms through the fused ``F.rms_norm``: the same loss and gradients, bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from phivlm.models.lm import load_lm
from phivlm.models.norms import fuse_rms_norms
from test_frozen_weights import _loss_and_grads, _vlm


@pytest.mark.parametrize("tuning", ["frozen", "lora", "full"])
def test_fused_norms_give_the_same_loss_and_gradients(tuning):
    plain = _vlm(tuning)
    fused = copy.deepcopy(plain)
    n_layers = fused.base_lm.config.num_hidden_layers
    assert fuse_rms_norms(fused.base_lm) == 2 * n_layers + 1  # two per layer and the final one
    with torch.no_grad():  # norm weights other than ones, so a dropped or misplaced weight shows
        for a, b in zip(plain.base_lm.modules(), fused.base_lm.modules()):
            if isinstance(a, LlamaRMSNorm):
                a.weight.normal_(1, 0.3)
                b.weight.copy_(a.weight)
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(fused)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_a_bf16_input_takes_transformers_own_path():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16)
    x = torch.randn(3, 16).bfloat16()
    want = norm(x)
    fuse_rms_norms(norm)
    got = norm(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_other_norms_are_left_alone():
    assert fuse_rms_norms(load_lm("tiny-phi")) == 0  # Phi's LayerNorm is one kernel already
