"""``phivlm bench``: phivlm against the ``transformers`` Llava reference, on identical inputs, interleaved.

Figures (each measured in one run; contenders alternate ABBA round by round, so machine load hits both):

1. stage 1 — projector (+ separator) training with the LM frozen: phivlm's step (a collated batch of cached
   features -> ``PhiVLM.forward`` -> backward -> AdamW) against ``LlavaForConditionalGeneration`` on the same
   padded batches with pixel values (vision tower every step, logits everywhere, Llava's loss);
2. stage 2 — the same with PEFT LoRA on the LM (phivlm: ``apply_tuning``; reference: PEFT on the same modules);
3. MFU — matmul FLOPs actually done per step (``measure.MatmulFlops``) per second over the bf16 matmul peak
   probed between rounds on the same cores;
4. feature caching — ``build_features`` (decode, preprocess, encode, write shards) against the bare
   ``CLIPVisionModel`` forward on the same images, already preprocessed;
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
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TuningConfig
from ..registry import PhivlmError
from ..runtime import resolve_precision
from . import measure
from .measure import MatmulPeak, Timing, count_flops, interleave, memory, paired_ratio

log = logging.getLogger("phivlm.bench")
FIGURES = ("stage1", "stage2", "features", "generation")
GOALS = {"stage1_speedup": 2.0, "stage2_speedup": 1.3, "stage2_mfu": 0.40, "generation_speedup": 1.0}
PRESETS = {
    "full": dict(vision="clip-vit-b32", lm="smollm2-135m", batch_size=8, batches=2, rounds=4, images=64,
                 feature_batch=32, new_tokens=32, matmul_n=2048, matmul_s=0.3),
    "quick": dict(vision="tiny-clip", lm="tiny-llama", batch_size=4, batches=2, rounds=2, images=16,
                  feature_batch=4, new_tokens=4, matmul_n=256, matmul_s=0.02),
}
PROMPT = "<image>\nDescribe the image in detail."


@dataclass
class BenchConfig:
    quick: bool = False
    vision: str = ""  # empty: the preset's
    lm: str = ""
    batch_size: int = 0  # training batch (samples)
    batches: int = 0  # distinct batches, cycled through the rounds
    rounds: int = 0  # timed rounds per figure (after a warm-up over every batch)
    images: int = 0  # synthetic images (training data; the feature figure encodes all of them)
    feature_batch: int = 0
    new_tokens: int = 0
    matmul_n: int = 0
    matmul_s: float = 0.0
    threads: int = 0  # 0: OMP_NUM_THREADS, else torch's default
    figures: str = ",".join(FIGURES)
    workdir: str = ""  # kept if given; else a temporary folder, removed afterwards
    profile: str = ""  # folder for torch.profiler tables of one step of each contender
    seed: int = 0

    def resolved(self) -> "BenchConfig":
        preset = PRESETS["quick" if self.quick else "full"]
        out = dataclasses.replace(self)
        for k, v in preset.items():
            if not getattr(out, k):
                setattr(out, k, v)
        if not out.threads:
            out.threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
        unknown = set(out.figure_list) - set(FIGURES)
        if unknown:
            raise PhivlmError(f"unknown bench figure(s) {sorted(unknown)}; valid: {', '.join(FIGURES)}")
        return out

    @property
    def figure_list(self) -> list[str]:
        return [f.strip() for f in self.figures.split(",") if f.strip()]


# -- shared setup ------------------------------------------------------------------------------------

class Env:
    """What every figure shares: synthetic data, the phivlm tower and feature cache, the full CLIP model,
    the tokenizer, the matmul-peak probe and the load-average record."""

    def __init__(self, cfg: BenchConfig, work: Path):
        from transformers import CLIPVisionModel

        from ..data.features import build_features
        from ..data.synth import synthesize
        from ..models import builtin
        from ..models.lm import load_tokenizer
        from ..models.vision import VisionTower

        self.cfg, self.work = cfg, work
        self.feature_layer = -2
        self.data = synthesize(work / "data", n_train=cfg.images, n_val=0, seed=cfg.seed)
        self.images = self.data["images"]
        self.tower = VisionTower(cfg.vision, self.feature_layer)
        # the reference's own copy, every layer (phivlm's tower drops the layers after the feature layer)
        self.clip = CLIPVisionModel.from_pretrained(builtin.resolve(cfg.vision), dtype=torch.float32,
                                                    use_safetensors=True).eval()
        self.tok = load_tokenizer(cfg.lm)
        names = sorted(p.name for p in Path(self.images).iterdir())
        self.image_names = names
        self.store, _ = build_features(self.tower, self.images, names, work / "features",
                                       batch_size=cfg.feature_batch)
        self.peak = MatmulPeak(cfg.matmul_n, cfg.matmul_s)
        self.loads: list[float] = [os.getloadavg()[0]]

    def probe(self) -> None:
        self.peak.probe()
        self.loads.append(os.getloadavg()[0])

    def pixels(self, names: list[str]) -> torch.Tensor:
        from ..data.images import image_path, open_rgb

        return self.tower.preprocess([open_rgb(image_path(self.images, n)) for n in names])

    def autocast(self):
        """Both contenders in the precision ``auto`` picks on this host (bf16 only where the CPU has it)."""
        from ..runtime import autocast

        return autocast(torch.device("cpu"), "auto")


def _vlm(env: Env):
    from ..models.lm import load_lm
    from ..models.vlm import PhiVLM

    torch.manual_seed(env.cfg.seed)
    lm = load_lm(env.cfg.lm).requires_grad_(False)
    vlm = PhiVLM(lm, env.tower.hidden_size, env.tower.num_patches, projector="mlp2x_gelu")
    vlm.feature_norm.fit(env.store.get(env.image_names))  # as training does: statistics of the training images
    return vlm


# -- stages 1 and 2 --------------------------------------------------------------------------------------

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
    from ..train.tuning import apply_tuning, lora_targets
    from .reference import Reference

    cfg = env.cfg
    tuning = TuningConfig(lm_tuning="frozen" if stage == 1 else "lora")
    vlm = _vlm(env)
    ref = Reference(env.clip, vlm, env.feature_layer)
    if stage == 1:
        vlm.lm = apply_tuning(vlm.lm, tuning)
        ref.freeze_for_stage1()
    else:
        targets = lora_targets(vlm.lm, tuning)
        vlm.lm = apply_tuning(vlm.lm, tuning)
        ref.apply_lora(tuning, targets)
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
    mem = {name: memory(lambda: fn(0), model, opt) for name, (fn, model, opt) in steps.items()}
    log.info("stage %d: %d interleaved rounds", stage, cfg.rounds)
    timing = interleave({name: s[0] for name, s in steps.items()}, cfg.rounds, between=env.probe)
    prof = _profile(env, f"stage{stage}", {name: (lambda fn=fn: fn(0)) for name, (fn, _, _) in steps.items()})

    out = {"batch_size": cfg.batch_size, "tokens_per_batch": tokens, "labelled_tokens_per_batch": labels,
           "first_loss": first_loss, "loss_abs_diff": abs(first_loss["phivlm"] - first_loss["reference"])}
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


# -- feature caching -----------------------------------------------------------------------------------

def features_figure(env: Env) -> dict:
    from ..data.features import build_features

    cfg = env.cfg
    names = env.image_names
    pixels = env.pixels(names)
    roots: list[Path] = []

    def phivlm_features(r: int) -> None:
        root = env.work / f"bench-features-{len(roots)}"
        roots.append(root)
        build_features(env.tower, env.images, names, root, batch_size=cfg.feature_batch)

    @torch.no_grad()
    def bare_forward(r: int) -> None:
        with env.autocast():
            for chunk in pixels.split(cfg.feature_batch):
                env.clip(pixel_values=chunk)

    fns = {"phivlm": phivlm_features, "reference": bare_forward}
    for fn in fns.values():
        fn(-1)
    mem = {"phivlm": memory(lambda: phivlm_features(-1), env.tower.model),
           "reference": memory(lambda: bare_forward(-1), env.clip)}
    log.info("features: %d interleaved rounds of %d images", cfg.rounds, len(names))
    timing = interleave(fns, cfg.rounds)
    prof = _profile(env, "features", {k: (lambda fn=fn: fn(-1)) for k, fn in fns.items()})
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    out = {"images": len(names), "batch_size": cfg.feature_batch}
    for name in fns:
        t = timing[name]
        out[name] = {"images_per_s": statistics.median(len(names) / w for w in t.wall), "wall_s": t.wall,
                     "cpu_s": t.cpu, "memory": mem[name]}
        if prof:
            out[name]["profile"] = prof[name]
    out["speedup"] = paired_ratio(timing["reference"], timing["phivlm"])
    return out


# -- generation ------------------------------------------------------------------------------------------

def generation_figure(env: Env) -> dict:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.streamers import BaseStreamer

    from ..data.templates import encode_prompt, get_template, resolve_template_name
    from ..generate import GenerationConfig, generate
    from .reference import Reference

    cfg = env.cfg
    vlm = _vlm(env).eval()
    ref = Reference(env.clip, vlm, env.feature_layer)
    ref.model.eval()
    if resolve_precision("auto") == "bf16":  # what Assistant (chat, serve, eval, generate) does
        vlm.hold_weights_in(torch.bfloat16)
    template = get_template(resolve_template_name("auto", env.tok))
    ids = torch.tensor([encode_prompt(template, env.tok, [("user", PROMPT)], env.tower.num_patches)])
    mask = torch.ones_like(ids)
    rids = ref.ids(ids)
    pixels = env.pixels(env.image_names[:1])
    n_new = cfg.new_tokens
    gen = GenerationConfig(max_new_tokens=n_new)  # greedy
    hf_gen = HFGenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                eos_token_id=env.tok.eos_token_id, pad_token_id=env.tok.pad_token_id)
    ttft: dict[str, list[float]] = {"phivlm": [], "reference": []}
    tokens: dict[str, list[int]] = {}

    class FirstToken(BaseStreamer):
        def __init__(self, t0: float):
            self.t0, self.calls = t0, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                ttft["reference"].append(time.perf_counter() - self.t0)

        def end(self):
            pass

    @torch.no_grad()
    def phivlm_generate(r: int) -> None:
        t0 = time.perf_counter()
        first: list[float] = []

        def on_tokens(_):
            if not first:
                first.append(time.perf_counter() - t0)

        with env.autocast():
            feats = env.tower(pixels).float()
            out = generate(vlm, ids, mask, feats, {-1}, gen, on_tokens=on_tokens)  # no EOS: n_new tokens
        ttft["phivlm"].append(first[0])
        tokens["phivlm"] = out[0]

    @torch.no_grad()
    def reference_generate(r: int) -> None:
        streamer = FirstToken(time.perf_counter())
        with env.autocast():
            out = ref.model.generate(input_ids=rids, attention_mask=mask, pixel_values=pixels,
                                     generation_config=hf_gen, streamer=streamer)
        tokens["reference"] = out[0, ids.shape[1]:].tolist()

    fns = {"phivlm": phivlm_generate, "reference": reference_generate}
    for fn in fns.values():
        fn(-1)
    mem = {"phivlm": memory(lambda: phivlm_generate(-1), vlm, env.tower.model),
           "reference": memory(lambda: reference_generate(-1), ref.model)}
    for v in ttft.values():
        v.clear()
    log.info("generation: %d interleaved rounds of %d new tokens", cfg.rounds, n_new)
    timing = interleave(fns, cfg.rounds)
    prof = _profile(env, "generation", {k: (lambda fn=fn: fn(-1)) for k, fn in fns.items()})
    out = {"new_tokens": n_new, "prompt_tokens": int(ids.shape[1]), "batch_size": 1,
           "same_tokens": tokens["phivlm"] == tokens["reference"],
           "tokens": {k: len(v) for k, v in tokens.items()}}
    for name in fns:
        t, first = timing[name], ttft[name][:len(timing[name].wall)]
        out[name] = {
            "total_s": t.median_wall, "ttft_s": statistics.median(first),
            "tokens_per_s": statistics.median((n_new - 1) / (w - f) for w, f in zip(t.wall, first)),
            "end_to_end_tokens_per_s": statistics.median(n_new / w for w in t.wall),
            "wall_s": t.wall, "cpu_s": t.cpu, "ttft_all_s": first, "memory": mem[name]}
        if prof:
            out[name]["profile"] = prof[name]
    p, r = out["phivlm"], out["reference"]
    out["speedup"] = r["total_s"] / p["total_s"]
    out["speedup_tokens_per_s"] = p["tokens_per_s"] / r["tokens_per_s"]
    out["speedup_ttft"] = r["ttft_s"] / p["ttft_s"]
    del vlm, ref
    measure._trim()
    return out


# -- profiling ---------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
CAST_OPS = ("aten::copy_", "aten::_to_copy")


def _profile(env: Env, figure: str, fns: dict) -> dict:
    """One call of each contender under torch.profiler: a table per contender in ``--profile``, and the
    share of self CPU time in matmul kernels, in dtype casts/copies, and the top operators."""
    if not env.cfg.profile:
        return {}
    from torch.profiler import ProfilerActivity, profile

    folder = Path(env.cfg.profile)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        avg = prof.key_averages()
        (folder / f"{figure}_{name}.txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
        total = sum(e.self_cpu_time_total for e in avg) or 1
        share = lambda ops: sum(e.self_cpu_time_total for e in avg if e.key in ops) / total  # noqa: E731
        top = sorted(avg, key=lambda e: -e.self_cpu_time_total)[:8]
        out[name] = {"self_cpu_ms": total / 1e3, "matmul_share": share(MATMUL_OPS), "cast_copy_share": share(CAST_OPS),
                     "ops": sum(e.count for e in avg),
                     "top": [[e.key, round(e.self_cpu_time_total / 1e3, 2), e.count] for e in top]}
    return out


# -- the whole run ---------------------------------------------------------------------------------------

def _goals(res: dict) -> dict:
    goals = {}
    if "stage1" in res:
        goals["stage1_speedup"] = res["stage1"]["speedup"]
    if "stage2" in res:
        goals["stage2_speedup"] = res["stage2"]["speedup"]
        goals["stage2_mfu"] = res["stage2"]["phivlm"]["mfu"]
    if "generation" in res:
        goals["generation_speedup"] = min(res["generation"]["speedup_tokens_per_s"], res["generation"]["speedup_ttft"])
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


# -- report ------------------------------------------------------------------------------------------------

def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _memory_row(title: str, p: dict, r: dict, ratio: bool = False) -> str:
    """The table row "memory MB, held + step = peak" of phivlm (``p``) and the reference (``r``)."""
    def cell(m: dict) -> str:
        return f"{m['held_mb']:.0f} + {m['step_mb']:.0f} = {m['peak_mb']:.0f}"
    less = f" {r['memory']['peak_mb'] / p['memory']['peak_mb']:.2f}× less " if ratio else " "
    return f"| {title}: memory MB, held + step = peak | {cell(p['memory'])} | {cell(r['memory'])} |{less}| |"


def table(res: dict) -> str:
    """The results as a Markdown table (phivlm, reference, phivlm's advantage, goal)."""
    rows = ["| figure | phivlm | reference (Llava) | phivlm vs reference | goal |", "|---|---|---|---|---|"]
    goals = res.get("goals", {})

    def goal(key: str) -> str:
        g = goals.get(key)
        if not g:
            return ""
        target = f"{g['goal']:g}×" if "speedup" in key else f"{100 * g['goal']:g}%"
        return f"≥ {target}: {'met' if g['met'] else 'missed'}"

    for fig, title in (("stage1", "stage 1 (LM frozen)"), ("stage2", "stage 2 (LoRA)")):
        if fig not in res:
            continue
        s = res[fig]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| {title}: samples/s | {_f(p['samples_per_s'])} | {_f(r['samples_per_s'])} | "
                    f"**{s['speedup']:.2f}×** (CPU time {s['speedup_cpu']:.2f}×) | {goal(fig + '_speedup')} |")
        rows.append(f"| {title}: tokens/s | {_f(p['tokens_per_s'], 0)} | {_f(r['tokens_per_s'], 0)} | | |")
        rows.append(f"| {title}: s per step, wall / CPU | {p['step_s']:.3f} / {p['step_cpu_s']:.3f} | "
                    f"{r['step_s']:.3f} / {r['step_cpu_s']:.3f} | | |")
        rows.append(f"| {title}: matmul GFLOP per step (fwd + bwd) | {p['flops_per_step'] / 1e9:.1f} | "
                    f"{r['flops_per_step'] / 1e9:.1f} | {r['flops_per_step'] / p['flops_per_step']:.2f}× fewer | |")
        rows.append(f"| {title}: achieved GFLOP/s, MFU | {p['achieved_gflops']:.0f}, **{100 * p['mfu']:.1f}%** | "
                    f"{r['achieved_gflops']:.0f}, {100 * r['mfu']:.1f}% | | "
                    f"{goal('stage2_mfu') if fig == 'stage2' else ''} |")
        rows.append(_memory_row(title, p, r, ratio=True))
    if "features" in res:
        s = res["features"]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| feature caching: images/s (phivlm: files → shards; reference: bare forward) | "
                    f"{_f(p['images_per_s'], 1)} | {_f(r['images_per_s'], 1)} | {s['speedup']:.2f}× | |")
        rows.append(_memory_row("feature caching", p, r))
    if "generation" in res:
        s = res["generation"]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| generation: decode tokens/s | {_f(p['tokens_per_s'], 1)} | {_f(r['tokens_per_s'], 1)} | "
                    f"**{s['speedup_tokens_per_s']:.2f}×** | {goal('generation_speedup')} (both) |")
        rows.append(f"| generation: time to first token, s | {p['ttft_s']:.3f} | {r['ttft_s']:.3f} | "
                    f"**{s['speedup_ttft']:.2f}×** | |")
        rows.append(f"| generation: {s['new_tokens']} tokens end to end, s | {p['total_s']:.3f} | {r['total_s']:.3f} | "
                    f"{s['speedup']:.2f}× | |")
        rows.append(_memory_row("generation", p, r))
    if "matmul_peak" in res:
        m = res["matmul_peak"]
        rows.append(f"| bf16 matmul peak ({m['n']}², {m['probes']} probes): best / median GFLOP/s | "
                    f"{m['peak_gflops']:.0f} / {m['median_gflops']:.0f} | | | |")
    return "\n".join(rows)


def summary(res: dict) -> str:
    m = res["machine"]
    head = (f"phivlm bench: {res['config']['vision']} + {res['config']['lm']}, {m['threads']} threads on {m['cores']} "
            f"cores ({m['cpu']}); load average {m['loadavg_start'][0]:.2f} at start, median "
            f"{m['loadavg_1min_median']:.2f}, max {m['loadavg_1min_max']:.2f}; {m['wall_s']:.0f} s")
    return head + "\n\n" + table(res)
