"""Measuring tools of ``phivlm bench``: interleaved timing, the bf16 matmul peak, matmul FLOP counting, memory.

FLOPs are counted analytically from the shapes each matmul actually sees (forward hooks), not from a
formula of the model: every ``nn.Linear`` call costs 2·N·in·out FLOPs forward (N = rows of its input), and
in the backward 2·N·in·out for the input gradient (only if its input needs a gradient) plus 2·N·in·out for
the weight gradient (only if its weight is trained); a convolution (CLIP's patch embedding) likewise, with
2·(output elements)·(in channels / groups)·(kernel size). Attention (``*Attention`` modules with a ``q_proj``)
costs 4·B·T²·d forward (QKᵀ and PV over the full T×T score matrix, as a masked kernel computes it;
d = heads × head dim) and twice that backward when its input needs a gradient. Element-wise work (norms,
activations, softmax, casts) is not counted, as usual for MFU.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..models import unpadded


# -- timing ------------------------------------------------------------------------------------------

@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, process CPU s, result) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def interleave(contenders: dict[str, Callable[[int], object]], rounds: int,
               between: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Run each contender once per round, alternating the order (ABBA...), so that a load change on a
    shared machine hits every contender alike; ``fn(round)`` picks the round's input. ``between`` runs
    after every round (e.g. a matmul-peak probe, interleaved the same way)."""
    names = list(contenders)
    out = {n: Timing() for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            w, c, _ = timed(lambda: contenders[n](r))
            out[n].wall.append(w)
            out[n].cpu.append(c)
        if between is not None:
            between()
    return out


def paired_ratio(slow: Timing, fast: Timing) -> float:
    """Median over rounds of slow/fast wall time (same round = same input, close in time)."""
    return statistics.median(s / f for s, f in zip(slow.wall, fast.wall))


# -- bf16 matmul peak ----------------------------------------------------------------------------------

class MatmulPeak:
    """bf16 (n×n)·(n×n) products in a loop for ``seconds``: the attainable bf16 matmul FLOP/s of these cores
    with the current thread setting. Probed repeatedly during a run; the peak is the best probe."""

    def __init__(self, n: int, seconds: float):
        g = torch.Generator().manual_seed(0)
        self.n, self.seconds = n, seconds
        self.a = torch.randn(n, n, generator=g).to(torch.bfloat16)
        self.b = torch.randn(n, n, generator=g).to(torch.bfloat16)
        self.samples: list[float] = []
        torch.mm(self.a, self.b)  # warm-up

    def probe(self) -> float:
        k, t0 = 0, time.perf_counter()
        while True:
            torch.mm(self.a, self.b)
            k += 1
            el = time.perf_counter() - t0
            if el >= self.seconds:
                break
        flops = 2 * self.n ** 3 * k / el
        self.samples.append(flops)
        return flops

    @property
    def peak(self) -> float:
        return max(self.samples)

    def summary(self) -> dict:
        return {"n": self.n, "dtype": "bfloat16", "probes": len(self.samples), "peak_gflops": self.peak / 1e9,
                "median_gflops": statistics.median(self.samples) / 1e9,
                "min_gflops": min(self.samples) / 1e9}


# -- FLOP counting -------------------------------------------------------------------------------------

def _out_features(m: nn.Module) -> int:
    return getattr(m, "out_features", None) or m.base_layer.out_features


class MatmulFlops:
    """Counts matmul FLOPs (forward, backward) of everything ``modules`` run while active (see module doc)."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.forward = self.backward = 0
        # forward + backward of what FlopCounterMode sees on CPU: Linear and Conv calls, and attention where it runs
        # as plain matmuls (eager; it does not see the SDPA kernel)
        self.dense = 0
        self._handles: list = []

    def _dense(self, mod: nn.Module, args, out):
        x = args[0]
        if isinstance(mod, nn.Linear):
            f = 2 * (x.numel() // x.shape[-1]) * mod.in_features * mod.out_features
        else:  # convolution
            f = 2 * out.numel() * (mod.in_channels // mod.groups) * mod.weight[0, 0].numel()
        b = 0
        if torch.is_grad_enabled():
            b += f if x.requires_grad else 0
            b += f if mod.weight.requires_grad else 0
        self.forward += f
        self.backward += b
        self.dense += f + b

    def _attention(self, mod: nn.Module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        bsz, t = h.shape[0], h.shape[1]
        if kwargs.get("phivlm_rows") is not None:  # unpadded training: attention runs on the padded (B, T) layout
            bsz, t = kwargs["attention_mask"].shape[0], kwargs["attention_mask"].shape[-1]
        f = 4 * bsz * t * t * _out_features(mod.q_proj)
        b = 2 * f if torch.is_grad_enabled() and h.requires_grad else 0
        self.forward += f
        self.backward += b
        if getattr(getattr(mod, "config", None), "_attn_implementation", None) in ("eager", unpadded.NAME):
            self.dense += f + b

    def __enter__(self):
        seen: set[int] = set()
        for root in self.modules:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    self._handles.append(m.register_forward_hook(self._dense))
                elif type(m).__name__.endswith("Attention") and hasattr(m, "q_proj"):
                    self._handles.append(m.register_forward_pre_hook(self._attention, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_flops(fn: Callable[[], object], *modules: nn.Module) -> tuple[MatmulFlops, float, object]:
    """Run ``fn`` once with the hook count and torch's FlopCounterMode (which counts mm/addmm/bmm, eager attention's
    included, but not the SDPA kernel): returns (count, FlopCounterMode total, fn's result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with MatmulFlops(*modules) as count, FlopCounterMode(display=False) as fc:
        out = fn()
    return count, float(fc.get_total_flops()), out


# -- memory --------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS, so the next RSS rise is new memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def transient_mb(fn: Callable[[], object]) -> tuple[float, str]:
    """Peak RSS during ``fn()`` above the RSS just before it, in MB (activations, gradients, buffers: what
    one step needs on top of what is already resident); and the method used."""
    _trim()
    before = _status_kb("VmRSS")
    if before is not None and _reset_peak():
        fn()
        return max(0, _status_kb("VmHWM") - before) / 1024, "VmHWM reset"
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # macOS reports bytes
    return max(0, after_max - before_max) * scale / 1024, "ru_maxrss growth (lower bound)"


def tensor_mb(*objs) -> float:
    """MB of the distinct parameters and buffers of modules, and the state tensors of optimizers."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.is_mkldnn:  # an opaque prepacked weight: no storage to share
            total += t.numel() * t.element_size()
        elif isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
            decoder = getattr(o, "decoder", None)  # PhiVLM's decoding weights (models.decoder)
            for t in decoder.tensors() if decoder is not None else ():
                add(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for t in st.values():
                    add(t)
    return total / 2 ** 20


def memory(fn: Callable[[], object], *held) -> dict:
    """Memory of one contender: what it holds (``held``: its models and optimizer) and one call's transient."""
    step, method = transient_mb(fn)
    held_mb = tensor_mb(*held)
    return {"held_mb": held_mb, "step_mb": step, "peak_mb": held_mb + step, "method": method}


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024
