"""Loading models: checkpoints (``checkpoint``), ``phivlm export`` folders (``export``) and the LM tuning they
were trained with (``tuning``: freezing, LoRA/QLoRA adapters). Inference, serving, evaluation, export and training
load through here; ``phivlm.train`` writes checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..models.vision import VisionTower
from ..models.vlm import PhiVLM


@dataclass
class Loaded:
    """A model ready to run: the VLM, its tokenizer, its vision tower and the run config it was trained with."""

    vlm: PhiVLM
    tok: object
    tower: VisionTower
    cfg: RunConfig
