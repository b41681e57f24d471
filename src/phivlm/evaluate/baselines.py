"""Grounding baselines: the same questions answered with the image features replaced.

``blind`` zeroes every image's features; ``shuffled`` gives each image the features of another image.
A model that uses the image scores far above both; one that answers from the text prior does not.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ..errors import PhivlmError

Transform = Callable[[torch.Tensor, int], torch.Tensor]
BASELINES: dict[str, Transform] = {}
DESCRIPTIONS: dict[str, str] = {}  # what replaces the features, as the report says it


def register(name: str, replaced_by: str):
    def deco(fn: Transform) -> Transform:
        BASELINES[name], DESCRIPTIONS[name] = fn, replaced_by
        return fn

    return deco


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (n >= 2): a shuffled cycle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = [0] * n
    for i, src in enumerate(order):
        out[src] = order[(i + 1) % n]
    return out


@register("blind", "zeros")
def blind(feats: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.zeros_like(feats)


@register("shuffled", "another image's")
def shuffled(feats: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Row i gets the features of another row (the rows are distinct images)."""
    if len(feats) < 2:
        raise PhivlmError("the shuffled-image baseline needs at least 2 distinct images")
    return feats[derangement(len(feats), seed)]
