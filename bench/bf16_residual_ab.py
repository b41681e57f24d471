"""A/B of a bf16 residual stream in training (measured, not adopted; see BENCHMARKS.md, "bf16 residual stream").

phivlm trains with fp32 embeddings and residual stream under bf16 autocast, as the transformers reference does.
With ``BF16RES=1`` this runs ``phivlm bench`` with the alternative: the LM's frozen RMSNorm weights held in bf16
and the input embeddings cast to bf16, so that the whole residual stream, norms and rotary embeddings stay bf16
(no activation casts). Usage, one ABBA pair::

    BF16RES=0 OMP_WAIT_POLICY=PASSIVE python bench/bf16_residual_ab.py stage1 4 off1.json
    BF16RES=1 OMP_WAIT_POLICY=PASSIVE python bench/bf16_residual_ab.py stage1 4 on1.json
"""
import os
import sys

import torch.nn.functional as F

import phivlm.models.norms as norms
import phivlm.models.vlm as vlm

if os.environ.get("BF16RES") == "1":
    prepare, embed = vlm.PhiVLM.prepare_training, vlm.PhiVLM.embed

    def prepare_bf16(self, dtype):
        prepare(self, dtype)
        if dtype is not None:
            for m in self.base_lm.modules():
                if "RMSNorm" in type(m).__name__ and not m.weight.requires_grad:
                    m.weight.data = m.weight.data.to(dtype)
            self._residual_dtype = dtype

    def embed_bf16(self, ids, feats):
        e = embed(self, ids, feats)
        d = getattr(self, "_residual_dtype", None)
        return e.to(d) if d is not None and self.training else e

    def rms_norm(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.variance_epsilon)

    vlm.PhiVLM.prepare_training, vlm.PhiVLM.embed, norms._fused_forward = prepare_bf16, embed_bf16, rms_norm

from phivlm.cli import main  # noqa: E402

sys.exit(main(["bench", "--figures", sys.argv[1], "--rounds", sys.argv[2], "--out", sys.argv[3]] + sys.argv[4:]))
