"""The LM's RMSNorm layers through torch's fused ``F.rms_norm`` while training: the same numbers, bit for bit,
in one kernel forward and backward instead of ``transformers``' five element-wise ops (pow, mean, rsqrt, two
multiplications), each a pass over the activations. With 61 norms in SmolLM2-135M, that element-wise work is a
visible share of a CPU training step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


def _fused_forward(self: LlamaRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return LlamaRMSNorm.forward(self, hidden_states)  # transformers casts back to the input dtype first
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def fuse_rms_norms(lm: nn.Module) -> int:
    """Run each ``LlamaRMSNorm`` of ``lm`` (Llama-architecture LMs: SmolLM2, TinyLlama, Llama) through
    ``F.rms_norm``; returns how many. Other norms (Phi's LayerNorm is fused already) are left alone."""
    norms = [m for m in lm.modules() if type(m) is LlamaRMSNorm]
    for m in norms:
        m.forward = _fused_forward.__get__(m)
    return len(norms)
