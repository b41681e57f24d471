"""Projector registry: maps vision features (d_vision) into the LM embedding space (d_lm)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..registry import Registry

PROJECTORS: Registry[Callable[[int, int, int], nn.Module]] = Registry("projector")


@PROJECTORS.register("linear")
def linear(d_vision: int, d_lm: int, depth: int = 0) -> nn.Module:
    return nn.Linear(d_vision, d_lm)


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(d_vision: int, d_lm: int, depth: int = 0) -> nn.Module:
    """LLaVA-1.5's connector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_vision, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))


class ResidualBlock(nn.Module):
    """x + Linear(GELU(Linear(LN(x))))."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualProjector(nn.Module):
    """The reference design: Linear(d_vision -> d_lm), then ``depth`` residual blocks."""

    def __init__(self, d_vision: int, d_lm: int, depth: int):
        super().__init__()
        self.proj = nn.Linear(d_vision, d_lm)
        self.blocks = nn.ModuleList(ResidualBlock(d_lm) for _ in range(depth))

    def forward(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


@PROJECTORS.register("residual")
def residual(d_vision: int, d_lm: int, depth: int = 2) -> nn.Module:
    return ResidualProjector(d_vision, d_lm, depth)


class SlotEmbedding(nn.Module):
    """A projector, then a learned vector per image-token slot (``--slot-embedding``) scaled by each projected
    token's own RMS: where a token lies (with ``--image-tiles``, its tile) becomes part of the token itself.

    Scaled, because projected tokens grow far larger than the LM's embeddings in stage 1 (RMS ~16-106 against
    ~0.13 for SmolLM2's): a fixed-size vector is lost next to them, and the LM's layers add too little to such a
    token for it to take in the text marker before it. Normalising the tokens down instead measured worse
    (demo stage-1 loss 0.48 vs 0.25)."""

    def __init__(self, projector: nn.Module, slots: int, d_lm: int, init: float = 0.3):
        super().__init__()
        self.projector = projector
        self.slots = nn.Parameter(torch.randn(slots, d_lm) * init)

    def forward(self, x):
        y = self.projector(x)
        return y + y.float().pow(2).mean(-1, keepdim=True).sqrt() * self.slots


def build_projector(name: str, d_vision: int, d_lm: int, depth: int, slots: int = 0) -> nn.Module:
    """The ``name`` projector; with ``slots`` > 0, followed by a ``SlotEmbedding`` of that many slots."""
    projector = PROJECTORS.get(name)(d_vision, d_lm, depth)
    return SlotEmbedding(projector, slots, d_lm) if slots else projector
