"""The LoRA-input dropout with a cheap CPU mask: its rate, scaling, independence, seeding and its wiring."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from phivlm.config import TuningConfig
from phivlm.loading.tuning import apply_tuning
from phivlm.models.dropout import FastDropout, keep_mask
from phivlm.models.lm import load_lm


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_keep_mask_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1000]), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.002  # 1e6 draws: sd ~0.0005


def test_keep_mask_elements_are_independent():
    """Neighbours (in one 64-bit draw and across draws) and rows are uncorrelated; no lane is biased."""
    torch.manual_seed(1)
    m = keep_mask(torch.Size([3000, 999]), 0.5).float()
    flat = m.reshape(-1)
    for lag in (1, 2, 3, 4, 999):
        corr = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(corr) < 0.01, (lag, corr)
    lane_rates = flat[: flat.numel() // 3 * 3].view(-1, 3).mean(0)
    assert torch.all((lane_rates - 0.5).abs() < 0.005), lane_rates


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(7)
    a = keep_mask(torch.Size([5, 11]), 0.2)
    torch.manual_seed(7)
    assert torch.equal(a, keep_mask(torch.Size([5, 11]), 0.2))
    assert not torch.equal(a, keep_mask(torch.Size([5, 11]), 0.2))


def test_fast_dropout_zeroes_and_scales_like_nn_dropout():
    torch.manual_seed(0)
    x = torch.randn(64, 300, requires_grad=True)
    drop = FastDropout(0.25).train()
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)  # the gradient goes through the same mask
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_lora_layers_get_fast_dropout(p):
    """Every adapted Linear's dropout is a FastDropout of the configured p (p = 0: PEFT's Identity stays)."""
    lm = apply_tuning(load_lm("tiny-llama"), TuningConfig(lm_tuning="lora", lora_rank=4, lora_dropout=p))
    drops = [d for m in lm.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops
    assert not any(isinstance(d, nn.Dropout) for d in drops)
    if p:
        assert all(isinstance(d, FastDropout) and d.p == p for d in drops)
    else:
        assert all(isinstance(d, nn.Identity) for d in drops)
