"""Device, precision and seeding: one place decides how compute runs."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .registry import PhivlmError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PhivlmError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU; fp16 only on GPU (fp16 matmul on CPU is ~700x slower here)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise PhivlmError("precision fp16 is GPU-only; use bf16 or fp32 on CPU")
    if precision not in ("bf16", "fp16"):
        raise PhivlmError(f"unknown precision {precision!r}; valid: bf16, fp16, fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
