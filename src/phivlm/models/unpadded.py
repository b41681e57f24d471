"""Training forward without padding: the LM's position-wise work (projections, MLP, norms, LoRA adapters) runs
on a batch's real tokens only, packed into one row; attention alone goes back to the padded layout.

A right-padded batch of captions or conversations is 10-20% padding, and every padded position costs a
token's matmuls forward and backward. flash-attention's variable-length kernels do this on a GPU; on the CPU,
where the LM runs ``transformers``' eager attention, this module does it for any LM whose attention goes
through ``transformers``' attention interface: an attention function, registered under ``NAME``, that
scatters the packed queries, keys and values into the padded layout, runs ``eager_attention_forward`` with
the padded batch's mask, and gathers the real rows back. Called without ``phivlm_rows`` (generation, the
prefill) it is plain eager attention.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

NAME = "phivlm_unpadded"
ROWS = 64


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, phivlm_rows=None, **kwargs):
    """query/key/value (1, heads, N, head_dim) of N packed tokens; ``phivlm_rows``: their (N,) flat indices in
    the padded (B, T) batch whose additive mask ``attention_mask`` (B, 1, T, T) is."""
    if phivlm_rows is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    b, _, t, _ = attention_mask.shape

    def padded(x: torch.Tensor) -> torch.Tensor:  # (1, h, N, d) -> (B, h, T, d), zeros at padding
        h, d = x.shape[1], x.shape[3]
        out = x.new_zeros(b * t, h, d).index_copy(0, phivlm_rows, x[0].transpose(0, 1))
        return out.view(b, t, h, d).transpose(1, 2)

    out, weights = eager_attention_forward(module, padded(query), padded(key), padded(value), attention_mask,
                                           scaling, dropout, **kwargs)  # out: (B, T, h, d)
    return out.reshape(b * t, *out.shape[2:]).index_select(0, phivlm_rows).unsqueeze(0), weights


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # eager's masks where no rows are given


def supports(lm) -> bool:
    """Whether ``lm`` (a ``*ForCausalLM``) can train unpadded: it runs eager attention through the interface."""
    return getattr(lm.config, "_attn_implementation", None) in ("eager", NAME)


def active(lm) -> bool:
    """Whether ``lm`` was switched to it by ``use``."""
    return getattr(lm.config, "_attn_implementation", None) == NAME


def use(lm) -> None:
    """Switch ``lm`` to the unpadded-capable attention (eager attention wherever no rows are given)."""
    lm.config._attn_implementation = NAME  # read by every attention layer at each call


def mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 padding mask -> (B, 1, T, T) additive causal mask, the finite minimum where masked (as
    ``transformers`` builds it, so a padded query row is never all -inf)."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal[None] & attention_mask.bool()[:, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]


def decoder_hidden(decoder, embeds: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, T, d) of a padded batch, computed on its real tokens only (zeros at
    padding)."""
    b, t, d = embeds.shape
    real = attention_mask.reshape(-1).bool()
    rows = real.nonzero().squeeze(1)
    # a few padding positions (masked as keys, their outputs unused) round the packed length up to a multiple
    # of ROWS: fewer distinct shapes for the allocator and oneDNN's kernel cache over a run
    if extra := -rows.numel() % ROWS:
        rows = torch.cat([rows, (~real).nonzero().squeeze(1)[:extra]]).sort().values
    hidden = decoder(inputs_embeds=embeds.reshape(b * t, d).index_select(0, rows).unsqueeze(0),
                     attention_mask=mask(attention_mask, embeds.dtype),
                     position_ids=position_ids.reshape(-1).index_select(0, rows).unsqueeze(0),
                     use_cache=False, phivlm_rows=rows)[0]
    return hidden.new_zeros(b * t, hidden.shape[-1]).index_copy(0, rows, hidden[0]).view(b, t, -1)
