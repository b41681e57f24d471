"""Bench figures 1-3: a stage-1 (LM frozen) or stage-2 (LoRA) training step of phivlm against the Llava
reference on the same batches: time, tokens/s, matmul FLOPs and MFU, memory."""
from __future__ import annotations

import logging
import random
import statistics
import time

import torch

from ..config import TuningConfig
from ..errors import PhivlmError
from ..runtime import compute_dtype
from . import measure
from .measure import Timing, count_flops, interleave, memory, paired_ratio
from .profiling import profile_calls
from .env import Env, make_vlm

log = logging.getLogger("phivlm.bench")


def _batches(env: Env, stage: int) -> list[list]:
    from ..data.dataset import VLMDataset
    from ..data.sources import load_samples
    from ..data.templates import get_template, resolve_template_name

    path = env.data["captions_train"] if stage == 1 else env.data["instruct_train"]
    template = get_template(resolve_template_name("plain" if stage == 1 else "auto", env.tok))
    ds = VLMDataset(load_samples(path), template, env.tok, env.tower.num_patches, max_length=256)
    cfg = env.cfg
    need = cfg.batch_size * cfg.batches
    if len(ds) < need:
        raise PhivlmError(f"bench: {len(ds)} stage-{stage} samples, {need} needed (raise --images)")
    order = random.Random(cfg.seed + stage).sample(range(len(ds)), need)
    return [[ds[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]] for k in range(cfg.batches)]


def training_figure(env: Env, stage: int) -> dict:
    from ..data.dataset import Collator
    from ..loading.tuning import apply_tuning, lora_targets
    from .reference import Reference

    cfg = env.cfg
    tuning = TuningConfig(lm_tuning="frozen" if stage == 1 else "lora")
    vlm = make_vlm(env)
    ref = Reference(env.clip, vlm, env.feature_layer)
    if stage == 1:
        vlm.lm = apply_tuning(vlm.lm, tuning)
        ref.freeze_for_stage1()
    else:
        targets = lora_targets(vlm.lm, tuning)
        vlm.lm = apply_tuning(vlm.lm, tuning)
        ref.apply_lora(tuning, targets)
    vlm.prepare_training(compute_dtype(torch.device("cpu"), "auto"))  # what train() does
    vlm.train()
    ref.model.train()
    own = list(vlm.projector.parameters()) + [vlm.separator]
    lm_params = [p for p in vlm.lm.parameters() if p.requires_grad]
    groups = [{"params": own, "lr": 1e-3}] + ([{"params": lm_params, "lr": 2e-4}] if lm_params else [])
    opt_p = torch.optim.AdamW(groups)
    opt_r = torch.optim.AdamW(ref.trainable(), lr=1e-3)
    trainable = {"phivlm": sum(p.numel() for p in own + lm_params),
                 "reference": sum(p.numel() for p in ref.trainable())}

    items = _batches(env, stage)
    collator = Collator(env.store, env.tok.pad_token_id)
    ref_batches = []
    tokens, labels = [], []
    for it in items:
        b = collator(it)
        tokens.append(int(b["attention_mask"].sum()))
        labels.append(int((b["labels"][:, 1:] != -100).sum()))
        ref_batches.append({"input_ids": ref.ids(b["input_ids"]), "attention_mask": b["attention_mask"],
                            "labels": b["labels"], "pixel_values": env.pixels([img for img, _, _ in it])})
    n = len(items)

    def phivlm_step(r: int) -> float:
        batch = collator(items[r % n])  # features read from the cache: part of phivlm's step
        with env.autocast():
            loss = vlm(**batch)
        loss.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)
        return loss.item()

    def reference_step(r: int) -> float:
        with env.autocast():
            loss = ref.model(**ref_batches[r % n]).loss
        loss.backward()
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        return loss.item()

    steps = {"phivlm": (phivlm_step, vlm, opt_p), "reference": (reference_step, ref.model, opt_r)}
    flops: dict[str, list] = {k: [] for k in steps}
    checks: dict[str, list] = {k: [] for k in steps}
    first_loss = {}
    log.info("stage %d: warm-up over %d batches, FLOPs counted", stage, n)
    for k in range(n):  # warm-up: every batch once, FLOPs counted (hooks, and FlopCounterMode as a check)
        for name, (fn, model, _) in steps.items():
            count, fc, loss = count_flops(lambda: fn(k), model)
            flops[name].append(count)
            checks[name].append((count.dense, fc))
            first_loss.setdefault(name, loss)
    compiled = _compile(env, vlm, phivlm_step, collator(items[0])) if cfg.compile else None
    mem = {name: memory(lambda: fn(0), model, opt) for name, (fn, model, opt) in steps.items()}
    log.info("stage %d: %d interleaved rounds", stage, cfg.rounds)
    timing = interleave({name: s[0] for name, s in steps.items()}, cfg.rounds, between=env.probe)
    prof = profile_calls(env, f"stage{stage}", {name: (lambda fn=fn: fn(0)) for name, (fn, _, _) in steps.items()})

    out = {"batch_size": cfg.batch_size, "tokens_per_batch": tokens, "labelled_tokens_per_batch": labels,
           "first_loss": first_loss, "loss_abs_diff": abs(first_loss["phivlm"] - first_loss["reference"]),
           "compiled": compiled}
    for name in steps:
        out[name] = _training_result(timing[name], flops[name], checks[name], tokens, cfg.batch_size, env)
        out[name]["memory"] = mem[name]
        out[name]["trainable_params"] = trainable[name]
        if prof:
            out[name]["profile"] = prof[name]
    out["speedup"] = paired_ratio(timing["reference"], timing["phivlm"])
    out["speedup_cpu"] = statistics.median(r / p for r, p in zip(timing["reference"].cpu, timing["phivlm"].cpu))
    del vlm, ref, opt_p, opt_r
    measure._trim()
    return out


def _compile(env: Env, vlm, step, batch: dict) -> dict:
    """``--compile`` as ``train`` does it (after the FLOPs were counted eagerly: the counters see no compiled
    kernels): the compiling passes over every batch, timed, and the compiled loss of a batch against eager's at
    the same weights (``force_eager``), the check that compiling changed no result beyond bf16 rounding."""
    from ..train.compiling import compile_layers

    compile_layers(vlm.base_lm, torch.device("cpu"))
    t0 = time.perf_counter()
    for k in range(env.cfg.batches):
        step(k)
    seconds = time.perf_counter() - t0
    with env.autocast():
        loss = vlm(**batch).item()
        with torch.compiler.set_stance("force_eager"):
            eager = vlm(**batch).item()
    return {"compile_s": seconds, "loss": loss, "eager_loss": eager, "loss_abs_diff": abs(loss - eager)}


def _training_result(t: Timing, flops: list, checks: list, tokens: list[int], bsz: int, env: Env) -> dict:
    n = len(flops)
    per_round = [(w, flops[r % n].total, tokens[r % n]) for r, w in enumerate(t.wall)]
    achieved = statistics.median(f / w for w, f, _ in per_round)
    probes = env.peak.samples[-len(t.wall):]
    fwd = sum(f.forward for f in flops) / n
    bwd = sum(f.backward for f in flops) / n
    return {
        "step_s": t.median_wall, "step_cpu_s": t.median_cpu, "wall_s": t.wall, "cpu_s": t.cpu,
        "samples_per_s": statistics.median(bsz / w for w, _, _ in per_round),
        "tokens_per_s": statistics.median(k / w for w, _, k in per_round),
        "flops_per_step": fwd + bwd, "forward_flops_per_step": fwd, "backward_flops_per_step": bwd,
        "achieved_gflops": achieved / 1e9,
        "mfu": achieved / env.peak.peak,
        # each round against the probe that followed it (the load of that moment), median
        "mfu_vs_adjacent_probe": statistics.median(f / w / p for (w, f, _), p in zip(per_round, probes)),
        "flop_check": {"hooks_dense_flops": sum(c[0] for c in checks) / n,
                       "flop_counter_mode_flops": sum(c[1] for c in checks) / n},
    }
