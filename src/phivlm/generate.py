"""Decoding with a KV cache: greedy or sampled (temperature, top-p), repetition penalty, stop at EOS."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .models.vlm import PhiVLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def next_token(logits: torch.Tensor, seen: torch.Tensor, gen: GenerationConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits."""
    if gen.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / gen.repetition_penalty, logits * gen.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if gen.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / gen.temperature, -1)
    if gen.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > gen.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: PhiVLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             image_features: torch.Tensor, eos_ids: set[int], gen: GenerationConfig,
             on_tokens: Callable[[torch.Tensor], None] | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Generate for a left-padded batch; returns the new token ids of each row (EOS excluded).

    ``on_tokens`` is called with each step's (B,) tokens (for streaming).
    """
    b = input_ids.shape[0]
    logits, cache = model.prefill(input_ids, attention_mask, image_features)
    vocab = logits.shape[-1]
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=logits.device)
    text_ids = input_ids.clamp(min=0, max=vocab - 1)
    seen.scatter_(1, text_ids, (input_ids >= 0) & attention_mask.bool())
    eos = torch.tensor(sorted(eos_ids), device=logits.device)
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    out: list[list[int]] = [[] for _ in range(b)]
    for i in range(gen.max_new_tokens):
        tok = next_token(logits, seen, gen, generator)
        finished = torch.isin(tok, eos)
        for r in range(b):
            if not done[r] and not finished[r]:
                out[r].append(int(tok[r]))
        if on_tokens is not None:
            on_tokens(torch.where(done | finished, -1, tok))
        done |= finished
        if bool(done.all()) or i == gen.max_new_tokens - 1:
            break
        seen[torch.arange(b), tok] = True
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        logits, cache = model.step(tok, attention_mask, cache)
    return out
