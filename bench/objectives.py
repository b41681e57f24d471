"""Step time (forward + backward) of the autoregressive objective over the standard one.

    python bench/objectives.py            # demo models: 49 random CLIP-B/32-sized features + SmolLM2-135M
    python bench/objectives.py --quick    # tiny models, a smoke run

Batch 8, 32 target tokens per row, prompts of different lengths, bf16 autocast (as training runs on
CPU), frozen LM (stage 1) and LoRA (stage 2). The autoregressive objective is timed at teacher-forcing
rates 0 (every target token fed back from the model: the worst case), 0.5 and 1. Objectives are
interleaved, so a load change on a shared machine hits all of them; medians after a warm-up. For
reference, the naive loop that re-runs the whole prefix for every target token (what the KV cache
avoids) is timed once, on a few target tokens spread evenly over the answer (``--naive-tokens``,
default 4), and extrapolated linearly to all of them: a token's cost grows linearly with its prefix,
so the mean over evenly spread tokens times their number estimates the whole loop.
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from phivlm.config import TuningConfig
from phivlm.models.lm import load_lm
from phivlm.models.vlm import IGNORE, IMAGE_ID, SEP_ID, PhiVLM
from phivlm.train.objectives import autoregressive_loss, split_prompt
from phivlm.loading.tuning import apply_tuning


def make_batch(vocab: int, batch: int, n_patches: int, d_vision: int, targets: int, prompt: tuple[int, int]):
    """A right-padded batch like the Collator's: [image][sep][prompt text][targets], prompts of varied length."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(prompt[0], prompt[1] + 1, (batch,), generator=g).tolist()
    width = n_patches + 1 + max(lens) + targets
    ids = torch.zeros(batch, width, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, n in enumerate(lens):
        text = torch.randint(10, vocab, (n + targets,), generator=g)
        row = torch.cat([torch.full((n_patches,), IMAGE_ID), torch.tensor([SEP_ID]), text])
        ids[r, : len(row)] = row
        labels[r, len(row) - targets : len(row)] = text[n:]
        mask[r, : len(row)] = 1
    feats = torch.randn(batch, n_patches, d_vision, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_features": feats}


def standard_step(vlm: PhiVLM, batch: dict, tf_rate: float) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vlm(**batch)
    loss.backward()


def autoregressive_step(vlm: PhiVLM, batch: dict, tf_rate: float) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = autoregressive_loss(vlm, batch, tf_rate).loss
    loss.backward()


def naive_step(vlm: PhiVLM, batch: dict, tf_rate: float, tokens: int = 0) -> None:
    """The reference implementation's loop: a full forward over prompt + targets so far for every target
    token (teacher-forced; a backward per token keeps memory bounded, the compute is the same).
    ``tokens`` > 0: only that many target positions, spread evenly over the continuation."""
    prompt, pmask, _, cont, cont_labels, _ = split_prompt(batch)
    count = (cont_labels != IGNORE).sum()
    n = cont.shape[1]
    for j in naive_positions(n, tokens):
        ids = torch.cat([prompt, cont[:, :j]], 1)
        mask = torch.cat([pmask, torch.ones_like(cont[:, :j])], 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = vlm.base_lm.get_decoder()(inputs_embeds=vlm.embed(ids, batch["image_features"]),
                                               attention_mask=mask, position_ids=vlm.position_ids(mask),
                                               use_cache=False)[0][:, -1]
            logits = vlm.base_lm.get_output_embeddings()(hidden).float()
        (F.cross_entropy(logits, cont_labels[:, j], ignore_index=IGNORE, reduction="sum") / count).backward()


def naive_positions(n: int, tokens: int) -> list[int]:
    """All ``n`` positions, or ``tokens`` of them spread evenly from the first to the last."""
    if tokens <= 0 or tokens >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (tokens - 1)) for i in range(tokens)}) if tokens > 1 else [n // 2]


def timed(step, vlm: PhiVLM, batch: dict, tf_rate: float) -> tuple[float, float]:
    """(wall s, process CPU s) of one forward + backward."""
    t, c = time.perf_counter(), time.process_time()
    step(vlm, batch, tf_rate)
    vlm.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    ap.add_argument("--lm", default=None, help="LM (default smollm2-135m; tiny-llama with --quick)")
    ap.add_argument("--tuning", default="frozen,lora", help="comma-separated LM tuning modes to time")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--tf-rates", default="0,0.5,1", help="teacher-forcing rates to time (comma-separated)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per objective (default 5; 3 with --quick)")
    ap.add_argument("--naive-steps", type=int, default=1, help="timed steps of the naive loop (0 = skip)")
    ap.add_argument("--naive-tokens", type=int, default=4,
                    help="target tokens the naive loop runs, extrapolated to all (0 = all of them)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm_name = args.lm or ("tiny-llama" if args.quick else "smollm2-135m")
    n_patches, d_vision = (4, 32) if args.quick else (49, 768)
    steps = args.steps or (3 if args.quick else 5)
    print(f"LM {lm_name}, {n_patches} x {d_vision} random image features, batch {args.batch}, "
          f"{args.targets} target tokens, bf16 autocast, {torch.get_num_threads()} threads; "
          f"median seconds per step (forward + backward), wall / CPU")
    print("| LM tuning | objective | teacher forcing | s per step (wall / CPU) | vs standard (wall / CPU) |")
    print("|---|---|---|---|---|")
    rates = [float(r) for r in args.tf_rates.split(",")]
    for mode in args.tuning.split(","):
        lm = apply_tuning(load_lm(lm_name), TuningConfig(lm_tuning=mode, lora_dropout=0.0))
        vlm = PhiVLM(lm, d_vision, n_patches).train()
        batch = make_batch(lm.config.vocab_size, args.batch, n_patches, d_vision, args.targets, (12, 24))
        runs = [("standard", "1 (always)", standard_step, 1.0)]
        runs += [("autoregressive", f"{p:g}", autoregressive_step, p) for p in rates]
        for _, _, step, p in runs:  # warm-up
            timed(step, vlm, batch, p)
        times: list[list[tuple[float, float]]] = [[] for _ in runs]
        for _ in range(steps):  # interleaved, so a load change on a shared machine hits every objective
            for t, (_, _, step, p) in zip(times, runs):
                t.append(timed(step, vlm, batch, p))
        if args.naive_steps:
            n = split_prompt(batch)[3].shape[1]
            k = len(naive_positions(n, args.naive_tokens))
            step = partial(naive_step, tokens=args.naive_tokens)
            label = "naive prefix re-run" + (f" (timed on {k} of {n} tokens, x{n / k:g})" if k < n else "")
            runs.append((label, "1", step, 1.0))
            times.append([tuple(x * n / k for x in timed(step, vlm, batch, 1.0)) for _ in range(args.naive_steps)])
        s, sc = median(times[0])
        for (name, rate, _, _), t in zip(runs, times):
            w, c = median(t)
            print(f"| {mode} | {name} | {rate} | {w:.2f} / {c:.2f} | {w / s:.2f}x / {c / sc:.2f}x |", flush=True)


def median(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


if __name__ == "__main__":
    main()
