"""Decoding steps per token: transformers' decoder layer against phivlm's (``models/decoder.py``), one process.

    python bench/decode_ab.py                    # SmolLM2-135M, batch 1, the precision `auto` picks
    python bench/decode_ab.py --precision fp32   # the path of a CPU without native bf16
    python bench/decode_ab.py --quick            # tiny-llama, a smoke run

Both contenders get the same prompt (49 image slots + 40 text tokens) and decode greedily; rounds alternate
(ABBA), medians are reported, with whether the greedy tokens are identical. An AVX2-only host can be
approximated on an AVX-512 one with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from phivlm.models.lm import load_lm
from phivlm.models.vlm import IMAGE_ID, PhiVLM
from phivlm.runtime import autocast, compute_dtype


def decode(vlm: PhiVLM, ids, mask, feats, n: int) -> tuple[float, list[int]]:
    """(ms per decoding step, greedy tokens) after one prefill."""
    logits, cache = vlm.prefill(ids, mask, feats)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = logits.argmax(-1)
        tokens.append(int(tok[0]))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, cache = vlm.step(tok, mask, cache)
    return (time.perf_counter() - t0) / n * 1e3, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    lm = load_lm("tiny-llama" if args.quick else "smollm2-135m", attention="eager").requires_grad_(False)
    torch.manual_seed(0)
    d_vision = 8 if args.quick else 768
    ref = PhiVLM(lm, d_vision, 49).eval()
    fast = copy.deepcopy(ref)
    dtype = compute_dtype(cpu, args.precision)
    if dtype is not None:
        ref.hold_weights_in(dtype)
    fast.prepare_decoding(dtype)
    assert fast.decoder is not None, "this LM decodes through transformers only"
    vocab = lm.get_input_embeddings().num_embeddings
    ids = torch.cat([torch.full((1, 49), IMAGE_ID), torch.randint(5, min(5000, vocab), (1, 40))], 1)
    mask, feats = torch.ones_like(ids), torch.randn(1, 49, d_vision)
    ms: dict[str, list[float]] = {"transformers": [], "phivlm": []}
    tokens: dict[str, list[int]] = {}
    contenders = {"transformers": ref, "phivlm": fast}
    with torch.no_grad(), autocast(cpu, args.precision):
        for name, vlm in contenders.items():  # warm-up
            decode(vlm, ids, mask, feats, 4)
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                t, tokens[name] = decode(contenders[name], ids, mask, feats, args.tokens)
                ms[name].append(t)
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"precision {args.precision} ({dtype or torch.float32}), {torch.get_num_threads()} threads, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for k, v in med.items():
        print(f"{k:>12}: {v:6.2f} ms per token (rounds: {', '.join(f'{x:.1f}' for x in ms[k])})")
    print(f"phivlm vs transformers: {med['transformers'] / med['phivlm']:.2f}x; "
          f"same greedy tokens: {tokens['phivlm'] == tokens['transformers']}")


if __name__ == "__main__":
    main()
