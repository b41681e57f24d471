"""Dropout with a cheap CPU mask, for the inputs of LoRA adapters.

PEFT puts an ``nn.Dropout`` on the input of every adapted Linear: 210 masks per SmolLM2-135M step. On the CPU
``bernoulli_`` costs ~15 ns per element (one 32-bit draw and a float compare each): 28% of a stage-2 LoRA step
on the Intel bench host. Here one 64-bit draw gives three 16-bit uniforms (the low 48 bits; the top 16 hold
only 15 random bits), a third of the RNG work, compared as integers. The keep probability is rounded to a
multiple of 1/65536 (for p = 0.05: 0.050003). CUDA tensors keep ``F.dropout`` (a fused kernel there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 3  # uniform int16 lanes of each random int64


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool CPU mask of ``shape``, each element True with probability 1 - p (p a multiple of 1/65536)."""
    n = shape.numel()
    bits = torch.empty(-(-n // _LANES), dtype=torch.int64).random_()
    lanes = bits.view(torch.int16).view(-1, 4)[:, :_LANES]
    threshold = round(p * 65536) - 32768
    return (lanes >= threshold).reshape(-1)[:n].view(shape)


class FastDropout(nn.Module):
    """``nn.Dropout(p)`` whose CPU mask comes from ``keep_mask``."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # under --compile, ``random_`` breaks the layer's graph at each adapter; ``F.dropout`` traced into the
        # graph instead gave another function (bench stage 2's weights: loss 10.25 compiled vs 10.80 eager, with or
        # without inductor's fallback_random, while this mask's graph-broken layers give eager's loss): kept
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return x * (keep_mask(x.shape, self.p).to(x.dtype) * (1.0 / (1.0 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(lm: nn.Module) -> None:
    """Swap each PEFT LoRA layer's ``nn.Dropout`` for a ``FastDropout`` of the same p."""
    for module in list(lm.modules()):
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, drop in list(drops.items()):
                if isinstance(drop, nn.Dropout):
                    drops[name] = FastDropout(drop.p)
