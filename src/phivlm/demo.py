"""``phivlm demo``: synthetic data -> features -> stage 1 -> stage 2 -> ``phivlm eval`` on held-out questions
(with the shuffled-image baseline) -> report."""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, RunConfig, stage_defaults
from .data.synth import synthesize
from .evaluate.run import MAX_NEW_TOKENS, evaluate
from .models.lm import load_tokenizer
from .runtime import choose_precision
from .train.compiling import cpu_compiler
from .train.loop import train

log = logging.getLogger(__name__)
EVAL_IMAGES = 60  # held-out images asked every question about them (~7 each), with right and shuffled images


# matmul probes (``matmul_gflops``) of the hosts that calibrate the time estimates, 2 cores: bf16 on an AMD EPYC
# (Zen 4, AVX512-BF16); fp32 on an AMD EPYC with ATen and oneDNN held to AVX2 (an approximation of an AVX2-only CPU)
REF_GFLOPS = {"bf16": 398.0, "fp32": 164.0}
SLOW_S = 20 * 60  # an estimate above this on a CPU without native bf16 points to --tiny


@dataclass(frozen=True)
class Preset:
    """What the demo trains; tuned to fit its CPU time budget (see README, "Quick start")."""

    vision: str
    lm: str
    image_size: int  # 0 = the tower's own
    image_tokens: int  # 0 = every patch
    feature_layer: int
    train_images: int
    s1_steps: int
    s1_lr: float
    s2_steps: int
    s2_lr: float  # projector and LM (adapters or weights) alike
    lm_tuning: str  # stage 2
    batch: int = 16
    image_tiles: int = 0  # 0 = the whole image at once
    tile_markers: str = "before"  # "after": each tile's marker after its token, where it can attend to the tile
    slot_embedding: bool = False
    s1_lora_lr: float = 0.0  # > 0: stage 1 also trains LoRA adapters (at this lr), and stage 2 goes on with them
    # stage 1's lr after warm-up; constant: the caption loss's late drop (~0.43 -> 0.3, when colour and shape of
    # several objects are learned) happens at full lr instead of at cosine's tail
    s1_schedule: str = "cosine"
    # stage 2: `plain` ("question\nanswer<eos>" per turn) is ~40% fewer tokens than SmolLM2's chat template
    # with its system prompt, and LoRA dropout costs ~30% of a CPU step (one RNG mask per adapted layer)
    s2_template: str = "plain"
    lora_dropout: float = 0.0
    compile: bool = False  # torch.compile the LM's decoder layers in both stages (``train.compiling``)
    # the time estimate: wall seconds on the reference host of the precision (REF_GFLOPS); bf16 scales by the square
    # root of the probe ratio (measured there: bf16 vs fp32 probes differ 2.1x, training steps 1.45x), fp32 by the
    # ratio itself (fp32 steps run at ~70% of the probe's rate: matmul-bound). Default: bf16 from its run at probe
    # 650 (754 s, compiled); fp32 from the 220-stage-2-step run at probe 164 (1776 s), stage 2 scaled to 300 steps
    ref_s: float = 0.0
    ref_fp32_s: float = 0.0


PRESETS = {
    # 126 px cut into 3x3 tiles of 42 px (3x3 DINOv2 patches each, pooled to one token per tile: one per grid
    # cell), layer 7 of 12; each tile's marker (" top left;") after its token, where it takes in what the tile
    # shows (markers before the tiles: position of one of several objects at chance among them, 46-56%), and a
    # slot embedding. LoRA from stage 1 on: with the LM frozen in stage 1, the same recipe read one-object scenes
    # only (53% overall); tile tokens alone, without LoRA in stage 1, or LoRA in stage 1 on whole-image tokens,
    # each scored 43-53%. 300 stage-2 steps, paid for by compiling: with 220, the compiled run's stage 2 ended at
    # loss 0.048 (colour 91%, position 86%, wrong in three-object scenes); 300 from the same stage 1 scored 99.8%
    "default": Preset("dinov2-small", "smollm2-135m", 126, 9, -6, 2000, s1_steps=180, s1_lr=5e-3, s2_steps=300,
                      s2_lr=1e-3, lm_tuning="lora", image_tiles=3, tile_markers="after", slot_embedding=True,
                      s1_lora_lr=1e-3, s1_schedule="constant", compile=True, ref_s=960, ref_fp32_s=2110),
    "long": Preset("dinov2-small", "smollm2-135m", 126, 9, -6, 4000, s1_steps=300, s1_lr=5e-3, s2_steps=450,
                   s2_lr=1e-3, lm_tuning="lora", image_tiles=3, tile_markers="after", slot_embedding=True,
                   s1_lora_lr=1e-3, s1_schedule="constant", compile=True, ref_s=2150, ref_fp32_s=4800),
    "tiny": Preset("tiny-clip", "tiny-llama", 0, 0, -2, 300, s1_steps=40, s1_lr=1e-3, s2_steps=120, s2_lr=3e-3,
                   lm_tuning="full", s2_template="auto", ref_s=60, ref_fp32_s=60),
}


def model_config(preset: str) -> ModelConfig:
    """The model ``preset`` trains: tower, image layout, LM (the rest as ``phivlm pretrain`` has it)."""
    p = PRESETS[preset]
    return dataclasses.replace(stage_defaults("pretrain").model, vision=p.vision, lm=p.lm,
                               feature_layer=p.feature_layer, image_size=p.image_size, image_tokens=p.image_tokens,
                               image_tiles=p.image_tiles, tile_markers=p.tile_markers, slot_embedding=p.slot_embedding)


def compile_choice(preset: Preset) -> tuple[bool, str]:
    """Whether the demo compiles the LM's layers here, and why: where the preset asks, on a GPU, or on a CPU that
    trains in bf16 and has a C++ compiler. In fp32 a CPU step is matmul-bound: compiled 1.04x faster (demo stage
    1, ATen and oneDNN held to AVX2), less than the ~45 s each stage spends compiling."""
    if not preset.compile:
        return False, "uncompiled"
    if not torch.cuda.is_available():
        if choose_precision("auto", torch.device("cpu"))[0] != "bf16":
            return False, "uncompiled (fp32 steps are matmul-bound: compiling would not pay for itself)"
        if cpu_compiler() is None:
            return False, "uncompiled (no C++ compiler found for torch.compile: install g++ for ~1.3x faster steps)"
    return True, "the LM's layers compiled (torch.compile, ~40 s at the start of each stage)"


def stage_configs(out: Path, data: dict, preset: str) -> tuple[RunConfig, RunConfig]:
    p = PRESETS[preset]
    s1 = stage_defaults("pretrain")
    s1.model = model_config(preset)
    s1.data.data, s1.data.images = data["captions_train"], data["images"]
    s1.data.features = str(out / "features")
    s1.train.output, s1.train.max_steps, s1.train.batch_size = str(out / "stage1"), p.s1_steps, p.batch
    s1.train.lr, s1.train.lr_schedule, s1.train.compile = p.s1_lr, p.s1_schedule, compile_choice(p)[0]
    if p.s1_lora_lr:
        s1.tuning.lm_tuning, s1.tuning.lora_dropout, s1.train.lm_lr = "lora", p.lora_dropout, p.s1_lora_lr
    s2 = RunConfig.from_dict(s1.to_dict())
    # no validation loss during stage 2: each pass over the 200 held-out conversations costs about 4 steps;
    # the held-out accuracy after training is the demo's measure
    s2.data.data, s2.data.template = data["instruct_train"], p.s2_template
    s2.tuning.lm_tuning, s2.tuning.lora_dropout = p.lm_tuning, p.lora_dropout
    s2.train.output, s2.train.max_steps, s2.train.lr, s2.train.lm_lr = str(out / "stage2"), p.s2_steps, p.s2_lr, p.s2_lr
    s2.train.lr_schedule = "cosine"
    return s1, s2


def print_examples(predictions: Path, per_type: int = 2) -> None:
    """A few held-out questions of each type: the expected answer, the model's, and with a shuffled image."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    shown: dict[str, int] = {}
    print(f"\n{'question':<44}{'expected':>14}{'model':>14}{'shuffled':>14}")
    for r in rows:
        if shown.get(r["type"], 0) < per_type:
            shown[r["type"]] = shown.get(r["type"], 0) + 1
            print(f"{r['prompt'][:43]:<44}{r['refs'][0]:>14}{r['model'][:13]:>14}{r.get('shuffled', '')[:13]:>14}")


def stopped_at_eos(predictions: Path, tok) -> float:
    """Share of the model's answers shorter than the generation cap: they ended with EOS, not by the cap."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return sum(len(tok(r["model"], add_special_tokens=False)["input_ids"]) < MAX_NEW_TOKENS["qa"]
               for r in rows) / max(len(rows), 1)


def matmul_gflops(precision: str, n: int = 512, seconds: float = 1.0) -> float:
    """Attainable matmul GFLOP/s of this host in ``precision`` (a short probe)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9


def host_report(preset: Preset) -> str:
    """The host, the precision ``auto`` picks and why, threads, and the demo's estimated wall time."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    precision, why = choose_precision("auto", torch.device("cpu"))
    gflops = matmul_gflops(precision)
    est = estimated_s(preset, precision, gflops)
    text = (f"host: {cpu}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} "
            f"threads\nprecision: {precision} ({why}); matmul probe {gflops:.0f} GFLOP/s\n"
            f"training: {compile_choice(preset)[1]}\nestimated time: ~{est / 60:.0f} min")
    if precision == "fp32" and est > SLOW_S:
        text += ("\nwithout native bf16 every step runs in fp32; `phivlm demo --tiny` runs the same pipeline on tiny "
                 "models in about a minute")
    return text


def estimated_s(preset: Preset, precision: str, gflops: float) -> float:
    """The demo's wall time on a host whose ``precision`` matmul probe gives ``gflops``."""
    if precision == "bf16":
        return preset.ref_s * (REF_GFLOPS["bf16"] / gflops) ** 0.5
    return preset.ref_fp32_s * REF_GFLOPS["fp32"] / gflops


def run_demo(args) -> int:
    out = Path(args.out)
    preset = "tiny" if args.tiny else "long" if getattr(args, "long", False) else "default"
    t0 = time.time()
    print(host_report(PRESETS[preset]), flush=True)
    # as many questions per conversation as give no answer away (one per object, and the count): more answers
    # per token of image than the default 2-4
    data = synthesize(out / "data", n_train=PRESETS[preset].train_images, n_val=40 if preset == "tiny" else 200,
                      turns=(4, 4))
    s1, s2 = stage_configs(out, data, preset)
    ckpt1 = train(s1)
    ckpt2 = train(s2, init=ckpt1)
    report, metrics = evaluate(ckpt2, [data["qa_val"]], data["images"], out / "eval", limit=EVAL_IMAGES,
                               baselines=["shuffled"], device=s2.train.device)
    qa = metrics["tasks"]["qa"]
    acc = {c: s["vqa_accuracy"] for c, s in qa["scores"].items()}
    print(f"\nHeld-out questions ({qa['n']}), VQAv2 accuracy, with the right image (model) and with "
          f"another image's features (shuffled):")
    print(f"{'type':<10}" + "".join(f"{c:>10}" for c in acc))
    for k in acc["model"]:
        print(f"{k:<10}" + "".join(f"{acc[c][k]:>10.1%}" for c in acc))
    predictions = Path(report).parent / "predictions.jsonl"
    print_examples(predictions)
    stopped = stopped_at_eos(predictions, load_tokenizer(s2.model.lm))
    print(f"\nanswers that ended with EOS (before the {MAX_NEW_TOKENS['qa']}-token cap): {stopped:.1%}")
    result = {"vqa_accuracy": acc, "n_questions": qa["n"], "stopped_at_eos": stopped,
              "seconds": round(time.time() - t0, 1), "checkpoint": str(ckpt2), "report": str(report)}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    image = Path(data["images"]) / json.loads(Path(data["qa_val"]).read_text().splitlines()[0])["image"]
    print(f"\ndemo finished in {result['seconds']:.0f} s; report: {report}\ntry:\n"
          f"  phivlm chat --checkpoint {ckpt2} --image {image}")
    return 0
