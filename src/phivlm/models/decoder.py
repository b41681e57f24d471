"""One-token decoding steps for Llama-architecture LMs (SmolLM2, TinyLlama, Llama), with a preallocated KV cache.

Written by hand because transformers' generic decoder layer spends half of a CPU decoding step outside its
matmuls: at batch 1, bf16, SmolLM2-135M took 23-28 ms per token on a 2-core AMD EPYC (AVX512-BF16), of
which its 121 weight products were 11 ms; the rest is ~600 small ops per token (mask building, cache
concatenation, rotary tables per layer, autocast casts) and their Python. Here a layer is about 30 ops:
q/k/v and gate/up are each one product, rotary cos/sin come once per step from the LM's own rotary module,
keys and values are written into a preallocated cache, and the weights are held prepacked for oneDNN
(``_Product``): 13-15 ms per token (``bench/decode_ab.py``). The arithmetic and its dtypes are those of
transformers' eager path under autocast (fp32 residual stream and norms, matmuls in the compute dtype, fp32
softmax), so greedy tokens agree; ``tests/test_decoder.py`` checks that against the LM's own forward. The
prompt itself still runs through transformers (``PhiVLM.prefill``), and its cache is adopted here.
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
    """(weight, bias) of one product for several Linears of the same input; the Linears' own tensors become
    views of it, so an unpacked product adds no memory."""
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


class _Product:
    """``x @ weight.T + bias`` for a 2-D ``x``, with a weight that is read once per decoding step.

    On a CPU the weight is held in oneDNN's prepacked layout: at batch 1 on a 2-core AMD EPYC (AVX512-BF16)
    a 3072 x 576 bf16 product took 80 us against 127 us for ``torch.mm`` (the head, 49,152 x 576: 1.08 against
    1.79 ms), with bitwise the same result in bf16 (checked here on the first product of each shape; where the
    check fails or the op is missing, one plain ``mm``). Packing copies the weight: the LM's own tensors stay
    for the prompt, which runs through transformers."""

    _checked: dict[tuple, bool] = {}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight_t = weight.t()
        self.bias = None if bias is None else bias.to(weight.dtype)  # autocast casts a Linear's bias too
        self.packed = self._pack(weight) if weight.device.type == "cpu" else None
        if self.packed is not None:
            self.weight_t = None

    def _pack(self, weight: torch.Tensor):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            key = (tuple(weight.shape), weight.dtype, self.bias is not None)
            if key not in self._checked:
                x = torch.randn(3, weight.shape[1]).to(weight.dtype)
                plain = self._mm(x)
                fast = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
                self._checked[key] = (torch.equal(fast, plain) if weight.dtype != torch.float32 else
                                      torch.allclose(fast, plain, rtol=1e-5, atol=1e-5))
            return packed if self._checked[key] else None
        except (RuntimeError, AttributeError):  # a torch without oneDNN, or a dtype it does not pack
            return None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self._mm(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` on an fp32 ``x`` in one fused op (bitwise the same as its six)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it, ``x * cos + rotate_half(x) * sin``, where rotate_half(x) =
    (-x2, x1): here (x2, x1) times a sin whose first half is negated, bitwise the same in two fewer ops."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


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
            self.layers.append((layer.input_layernorm, _Product(*_fuse([a.q_proj, a.k_proj, a.v_proj])),
                                _Product(a.o_proj.weight, a.o_proj.bias), layer.post_attention_layernorm,
                                _Product(*_fuse([m.gate_proj, m.up_proj])),
                                _Product(m.down_proj.weight, m.down_proj.bias)))
        head = lm.get_output_embeddings()
        self.head = _Product(head.weight.data, head.bias)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this decoder holds besides the LM's own (the prepacked weights and cast biases)."""
        products = [p for layer in self.layers for p in layer if isinstance(p, _Product)] + [self.head]
        return [t for p in products for t in (p.packed, p.bias) if t is not None]

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
        # every dtype below is explicit (autocast's choices, made once): autocast itself only adds dispatches
        with torch.autocast(tokens.device.type, enabled=False):
            return self._step(tokens, position_ids, attention_mask, cache)

    def _step(self, tokens, position_ids, attention_mask, cache: KVCache) -> torch.Tensor:
        b, t = tokens.shape[0], cache.length
        if t == cache.keys[0].shape[2]:
            cache.grow()
        hq, hk, hd, dt = self.heads, self.kv_heads, self.head_dim, self.dtype
        x = self.lm.get_input_embeddings()(tokens).float()  # (B, d) fp32 residual stream
        cos, sin = self.lm.model.rotary_emb(x, position_ids)  # (B, 1, head_dim) fp32
        half = hd // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        # additive mask as transformers' eager path builds it: 0 where attended, the fp32 minimum elsewhere;
        # without padding adding it changes nothing, so it is left out
        mask = None
        if not bool(attention_mask.all()):
            mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=x.device)
            mask = mask.masked_fill_(~attention_mask.bool(), torch.finfo(torch.float32).min)
            mask = mask.repeat_interleave(hk, 0).unsqueeze(1)  # (B * kv_heads, 1, T), as the scores are
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(_rms_norm(norm1, x).to(dt)).view(b, hq + 2 * hk, hd)
            qk = _rotate(qkv[:, :hq + hk], cos, sin).to(dt)  # queries and keys rotated at once
            keys, values = cache.keys[i], cache.values[i]
            keys.select(2, t).copy_(qk[:, hq:])
            values.select(2, t).copy_(qkv[:, hq + hk:])
            # grouped-query attention without repeating k/v: one batch entry per kv head, its query heads as rows
            k = keys.narrow(2, 0, t + 1).reshape(b * hk, t + 1, hd)
            v = values.narrow(2, 0, t + 1).reshape(b * hk, t + 1, hd)
            scores = torch.bmm(qk[:, :hq].reshape(b * hk, hq // hk, hd), k.transpose(1, 2)) * self.scaling
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(dt)
            x = x + o_proj(torch.bmm(probs, v).view(b, hq * hd))
            gate, up = gate_up_proj(_rms_norm(norm2, x).to(dt)).chunk(2, -1)
            x = x + down_proj(F.silu(gate) * up)
        cache.length = t + 1
        return self.lm.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (B, V) in fp32 of last hidden states (B, d), as the head computes them under autocast."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.to(self.dtype)).float()
