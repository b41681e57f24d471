"""How far compiled layers are from fp32, next to eager bf16 (BENCHMARKS.md, "Compiled decoder layers").

SmolLM2-135M's 30 decoder layers on a right-padded batch (4 rows of up to 60 tokens, real token embeddings) through
the packed training path: the last hidden states and the gradient of a fixed random projection of them with
respect to the input embeddings, in fp32, in eager bf16 autocast and with every layer compiled (bf16 autocast).
Prints relative errors against fp32. Usage: ``python bench/compile_numerics.py``.
"""
import copy

import torch

from phivlm.models import unpadded
from phivlm.models.lm import attention_for, load_lm
from phivlm.train.compiling import compile_layers

torch.manual_seed(0)
lm = load_lm("smollm2-135m", attention=attention_for(torch.device("cpu"))).requires_grad_(False)
unpadded.use(lm)
ids = torch.randint(0, 49000, (4, 60))
mask = torch.ones(4, 60, dtype=torch.long)
mask[1, 45:] = 0
mask[3, 30:] = 0
positions = (mask.cumsum(1) - 1).clamp(min=0)
embeds = lm.model.embed_tokens(ids).float()


def run(decoder, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = embeds.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = unpadded.decoder_hidden(decoder, x, mask, positions).float()
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    (h * w * mask[..., None]).sum().backward()
    return h.detach(), x.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


h32, g32 = run(lm.model, False)
hb, gb = run(lm.model, True)
compiled = copy.deepcopy(lm)
compile_layers(compiled, torch.device("cpu"))
hc, gc = run(compiled.model, True)
print(f"hidden states, relative error vs fp32: eager bf16 {rel(hb, h32):.4f}, compiled bf16 {rel(hc, h32):.4f}")
print(f"input gradient, relative error vs fp32: eager bf16 {rel(gb, g32):.4f}, compiled bf16 {rel(gc, g32):.4f}")
