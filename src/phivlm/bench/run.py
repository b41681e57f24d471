"""``phivlm bench``: phivlm against the ``transformers`` Llava reference, on identical inputs, interleaved.

Figures (each measured in one run; contenders alternate ABBA round by round, so machine load hits both):

1. stage 1 — projector (+ separator) training with the LM frozen: phivlm's step (a collated batch of cached
   features -> ``PhiVLM.forward`` -> backward -> AdamW) against ``LlavaForConditionalGeneration`` on the same
   padded batches with pixel values (vision tower every step, logits everywhere, Llava's loss);
2. stage 2 — the same with PEFT LoRA on the LM (phivlm: ``apply_tuning``; reference: PEFT on the same modules);
3. MFU — matmul FLOPs actually done per step (``measure.MatmulFlops``) per second over the bf16 matmul peak
   probed between rounds on the same cores;
4. feature caching — ``build_features`` (decode, preprocess, encode, write shards) against the bare
   ``CLIPVisionModel`` forward on the same images, already preprocessed; and the same for the demo's tower
   (``dinov2-small`` at the demo's size, tiles, pooling and feature layer) against ``Dinov2Model``'s bare forward;
5. generation — ``phivlm.generate`` (tower + prefill + greedy decode with a KV cache) against
   ``LlavaForConditionalGeneration.generate``, greedy, the same prompt, image and number of new tokens;
6. memory — per contender: tensors held (models, optimizer state) + the RSS peak of one call above the RSS
   before it (``measure.memory``).

Both contenders run in the precision `auto` picks on the host (bf16 autocast where the CPU has AVX512-BF16 or
AMX, else fp32), with fp32 weights and the same thread setting. phivlm uses the
``mlp2x_gelu`` projector here, the projector Llava has, so that both compute the same function (the first
losses are compared).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .inference import demo_features_figure, features_figure, generation_figure
from .env import BenchConfig, Env
from .training import training_figure

log = logging.getLogger("phivlm.bench")
GOALS = {"stage1_speedup": 2.0, "stage2_speedup": 1.5, "stage2_mfu": 0.25, "decode_speedup": 1.5,
         "ttft_speedup": 1.2}


def _goals(res: dict) -> dict:
    goals = {}
    if "stage1" in res:
        goals["stage1_speedup"] = res["stage1"]["speedup"]
    if "stage2" in res:
        goals["stage2_speedup"] = res["stage2"]["speedup"]
        goals["stage2_mfu"] = res["stage2"]["phivlm"]["mfu"]
    if "generation" in res:
        goals["decode_speedup"] = res["generation"]["speedup_tokens_per_s"]
        goals["ttft_speedup"] = res["generation"]["speedup_ttft"]
    return {k: {"value": v, "goal": GOALS[k], "met": bool(v >= GOALS[k])} for k, v in goals.items()}


def _machine(cfg: BenchConfig) -> dict:
    import peft
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def run_bench(cfg: BenchConfig, out: str | Path | None = None) -> dict:
    cfg = cfg.resolved()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="phivlm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"config": dataclasses.asdict(cfg), "machine": _machine(cfg)}
    res["machine"]["loadavg_start"] = list(os.getloadavg())
    busy = os.getloadavg()[0]
    if cfg.threads > 1 and busy + cfg.threads > (os.cpu_count() or 1) and not os.environ.get("OMP_WAIT_POLICY"):
        log.warning("load average %.1f on %d cores: with %d threads, OpenMP threads spin waiting for each other when "
                    "one is descheduled (steps here were up to 12x slower); set OMP_WAIT_POLICY=PASSIVE or use "
                    "--threads 1", busy, os.cpu_count(), cfg.threads)
    try:
        log.info("bench: %s + %s, %d threads, figures %s", cfg.vision, cfg.lm, cfg.threads, cfg.figures)
        env = Env(cfg, work)
        env.probe()
        for fig in cfg.figure_list:
            log.info("bench: %s", fig)
            if fig in ("stage1", "stage2"):
                res[fig] = training_figure(env, int(fig[-1]))
            elif fig == "features":
                res[fig] = features_figure(env)
            elif fig == "demo_features":
                res[fig] = demo_features_figure(env)
            else:
                res[fig] = generation_figure(env)
            env.probe()
        res["matmul_peak"] = env.peak.summary()
        res["machine"].update(loadavg_end=list(os.getloadavg()), loadavg_1min_max=max(env.loads),
                              loadavg_1min_median=statistics.median(env.loads), wall_s=time.time() - t0)
        res["goals"] = _goals(res)
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res
