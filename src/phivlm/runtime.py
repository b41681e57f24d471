"""Device, precision and seeding: one place decides how compute runs."""
from __future__ import annotations

import contextlib
import functools
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .config import PRECISIONS
from .errors import PhivlmError

log = logging.getLogger(__name__)
# measured on a 2-core AMD EPYC with AVX2 only: 1024^2 matmul 0.7 GFLOP/s in bf16 vs 42 in fp32
SLOW_BF16 = ("this CPU has neither AVX512-BF16 nor AMX-BF16, so bf16 runs in slow emulation "
             "(measured on such a host: bf16 matmul 0.7 GFLOP/s vs 42 in fp32); use --precision auto or fp32")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PhivlmError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where it reports none, e.g. not Linux)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16(flags: frozenset[str] | None = None) -> str | None:
    """The CPU's native bf16 matmul instructions ('AMX-BF16', 'AVX512-BF16'), or None."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def choose_precision(precision: str, device: torch.device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision to run, why): ``auto`` is bf16 only where the hardware runs it natively, else fp32."""
    if precision not in PRECISIONS:
        raise PhivlmError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            ok = torch.cuda.is_bf16_supported()
            return ("bf16", "the GPU supports bf16") if ok else ("fp32", "the GPU has no bf16")
        return precision, "asked for"
    if precision == "fp16":
        raise PhivlmError("precision fp16 is GPU-only (CPU fp16 matmul is ~1 GFLOP/s); use auto, bf16 or fp32")
    native = cpu_bf16(flags)
    if precision == "auto":
        if native:
            return "bf16", f"the CPU has {native} (torch capability {torch.backends.cpu.get_cpu_capability()})"
        return "fp32", ("the CPU has no native bf16: neither AVX512-BF16 nor AMX-BF16 "
                        f"(torch capability {torch.backends.cpu.get_cpu_capability()})")
    if precision == "bf16" and not native:
        return "bf16", "asked for; warning: " + SLOW_BF16
    return precision, "asked for"


@functools.lru_cache(maxsize=None)
def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision to compute in (``auto`` resolved), logged once with the reason."""
    chosen, why = choose_precision(precision, torch.device(device_type))
    (log.warning if "warning" in why else log.info)("precision %s on %s: %s", chosen, device_type, why)
    return chosen


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype matmuls run in for ``precision`` on ``device`` (``auto`` as ``resolve_precision`` decides);
    None for fp32 (no autocast)."""
    precision = resolve_precision(precision, torch.device(device).type)
    return None if precision == "fp32" else torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU, fp16 only on GPU; ``auto`` as ``resolve_precision`` decides."""
    dtype = compute_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
