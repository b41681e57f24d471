"""``--compile``: each of the LM's decoder layers through ``torch.compile`` (inductor) for training.

What is left of a CPU training step after the matmuls is element-wise work: autocast's casts of each
activation, rotary embeddings, SiLU times up-projection, residual adds, and their gradients, each a separate
pass over the activations (together ~25% of a stage-1 step of SmolLM2-135M). Inductor fuses them into a few
kernels per layer. Layers, not the whole model: every layer runs the same code, so one graph (with dynamic
shapes: packed lengths and batch shapes change from step to step) serves them all, and the parts around the
layers (feature cache, projector, packing, the loss on labelled positions) stay as they are. Measured on an
AMD EPYC with AVX512-BF16 (2 cores, bf16, the demo's stage 1): 1.96 -> 1.44 s per step after ~40 s of compiling;
outputs and input gradients as close to fp32 as eager bf16's (see BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from ..errors import PhivlmError
from ..models.lm import decoder_layers

log = logging.getLogger(__name__)


def cpu_compiler(which=shutil.which) -> str | None:
    """The C++ compiler inductor would use for CPU kernels ($CXX, else c++/g++/clang++), None without one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(which, names) if path), None)


def compile_layers(lm: nn.Module, device: torch.device, which=shutil.which) -> int:
    """Compile every decoder layer of ``lm`` in place (state-dict keys unchanged); returns how many. Compiling
    itself happens at the first steps."""
    if device.type == "cpu" and cpu_compiler(which) is None:
        raise PhivlmError("--compile on the CPU needs a C++ compiler (g++ or clang++; or set CXX): install one "
                          "or train without --compile")
    layers = decoder_layers(lm, "--compile")
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("--compile: %d decoder layers of %s, compiled during the first steps", len(layers), type(lm).__name__)
    return len(layers)
