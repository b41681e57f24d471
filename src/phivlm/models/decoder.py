"""One-token decoding steps for Llama-architecture LMs (SmolLM2, TinyLlama, Llama), with a preallocated KV cache.

Written by hand because transformers' generic decoder layer spends most of a CPU decoding step outside its
matmuls: at batch 1 SmolLM2-135M took ~28 ms per token on a 2-core AMD EPYC (AVX512-BF16), of which the
matmuls were ~8 ms; the rest is ~600 small ops per token (mask building, cache concatenation, rotary
tables per layer, autocast casts) and their Python. Here each layer is about 30 ops: q/k/v and gate/up are
each one matmul (the LM's own weights, made views of one fused tensor, so no memory is added), rotary
cos/sin are computed once per step by the LM's own rotary module, and keys and values are written into a
preallocated cache. The arithmetic and its dtypes are those of transformers' eager path under autocast
(fp32 residual stream and norms, matmuls in the compute dtype, fp32 softmax), so greedy tokens agree;
``tests/test_decoder.py`` checks that against the LM's own forward. The prompt itself still runs through
transformers (``PhiVLM.prefill``): its matmuls are large, and its cache is adopted here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def supports(lm: nn.Module) -> bool:
    """Whether ``lm`` (a ``*ForCausalLM``) is a plain Llama-architecture model this decoder computes exactly:
    Llama layers of plain Linears (no unmerged adapters, no quantisation), SiLU MLP, one tensor-parallel slice."""
    cfg = getattr(lm, "config", None)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if cfg is None or layers is None or getattr(cfg, "model_type", "") != "llama":
        return False
    if getattr(lm, "hf_quantizer", None) is not None or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "hidden_act", "") != "silu" or not hasattr(lm.model, "rotary_emb"):
        return False
    parts = [(layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")) for layer in layers]
    parts += [(layer.mlp, ("gate_proj", "up_proj", "down_proj")) for layer in layers]
    return all(type(getattr(module, n, None)) is nn.Linear for module, names in parts for n in names)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linears of the same input; the Linears' own tensors become views of it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.out_features
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` on an fp32 ``x``, op for op."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@dataclass
class KVCache:
    """Keys (after rotary) and values per layer, (B, kv_heads, capacity, head_dim) in the compute dtype;
    positions ``[:length]`` are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    def grow(self) -> None:
        for kv in (self.keys, self.values):
            for i, t in enumerate(kv):
                kv[i] = torch.cat([t, torch.empty_like(t)], 2)


class Decoder:
    """Decoding steps for one Llama-architecture LM (see ``supports``) in ``dtype`` (the matmuls' dtype:
    bf16 under ``--precision bf16``, else fp32); the LM's Linear weights must already be in it."""

    def __init__(self, lm: nn.Module, dtype: torch.dtype):
        self.lm, self.dtype = lm, dtype
        attn = lm.model.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = lm.config.num_attention_heads
        self.kv_heads = lm.config.num_key_value_heads
        self.layers = []
        for layer in lm.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, _fuse([a.q_proj, a.k_proj, a.v_proj]), a.o_proj,
                                layer.post_attention_layernorm, _fuse([m.gate_proj, m.up_proj]), m.down_proj))

    def adopt(self, cache, extra: int = 64) -> KVCache:
        """This decoder's cache holding what a transformers ``DynamicCache`` holds after the prompt, with room
        for ``extra`` more positions before it grows."""
        keys, values = [], []
        for layer in cache.layers:
            for src, dst in ((layer.keys, keys), (layer.values, values)):
                b, h, t, d = src.shape
                buf = torch.empty(b, h, t + extra, d, dtype=self.dtype, device=src.device)
                buf[:, :, :t] = src
                dst.append(buf)
        return KVCache(keys, values, cache.layers[0].keys.shape[2])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Feed one token per row (B,) at ``position_ids`` (B, 1) with ``attention_mask`` (B, cache.length + 1);
        returns the last hidden state (B, d) after the final norm, and advances ``cache``."""
        b, t = tokens.shape[0], cache.length
        if t == cache.keys[0].shape[2]:
            cache.grow()
        x = self.lm.get_input_embeddings()(tokens).unsqueeze(1).float()  # (B, 1, d) fp32 residual stream
        cos, sin = self.lm.model.rotary_emb(x, position_ids)  # (B, 1, head_dim) fp32
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # additive mask as transformers' eager path builds it: 0 where attended, the fp32 minimum elsewhere
        mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=x.device)
        mask = mask.masked_fill_(~attention_mask.bool(), torch.finfo(torch.float32).min)[:, None, None, :]
        hq, hk, hd = self.heads, self.kv_heads, self.head_dim
        for i, (norm1, (w_qkv, b_qkv), o_proj, norm2, (w_gu, b_gu), down) in enumerate(self.layers):
            h = _rms_norm(norm1, x).to(self.dtype)
            qkv = F.linear(h, w_qkv, b_qkv).view(b, hq + 2 * hk, 1, hd)
            q = _rotate(qkv[:, :hq], cos, sin).to(self.dtype)
            cache.keys[i][:, :, t:t + 1] = _rotate(qkv[:, hq:hq + hk], cos, sin)
            cache.values[i][:, :, t:t + 1] = qkv[:, hq + hk:]
            k, v = cache.keys[i][:, :, :t + 1], cache.values[i][:, :, :t + 1]
            # grouped-query attention without repeating k/v: the query heads of one kv head as rows
            scores = torch.matmul(q.view(b, hk, hq // hk, hd), k.transpose(2, 3)) * self.scaling + mask
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(self.dtype)
            out = torch.matmul(probs, v).reshape(b, 1, hq * hd)
            x = x + o_proj(out)
            gate, up = F.linear(_rms_norm(norm2, x).to(self.dtype), w_gu, b_gu).chunk(2, -1)
            x = x + down(F.silu(gate) * up)
        cache.length = t + 1
        return self.lm.model.norm(x)[:, -1]
