"""What every bench figure shares: the run's settings (``BenchConfig``, its presets) and ``Env`` (synthetic data,
the phivlm tower and feature cache, the reference's CLIP, the tokenizer, the matmul-peak probe)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PhivlmError
from .measure import MatmulPeak

FIGURES = ("stage1", "stage2", "features", "demo_features", "generation")
PRESETS = {
    "full": dict(vision="clip-vit-b32", lm="smollm2-135m", batch_size=8, batches=2, rounds=4, images=64,
                 feature_batch=32, new_tokens=32, matmul_n=2048, matmul_s=0.3),
    "quick": dict(vision="tiny-clip", lm="tiny-llama", batch_size=4, batches=2, rounds=2, images=16,
                  feature_batch=4, new_tokens=4, matmul_n=256, matmul_s=0.02),
}


def demo_tower(quick: bool):
    """The ``ModelConfig`` of ``phivlm demo``'s default preset, whose tower's feature caching the ``demo_features``
    figure measures; for ``--quick``, a tiny DINOv2 with registers, tiled the same way."""
    from ..config import ModelConfig
    from ..demo import model_config

    if quick:
        return ModelConfig(vision="tiny-dinov2", feature_layer=-2, image_size=56, image_tokens=4, image_tiles=2)
    return model_config("default")


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
    compile: bool = False  # phivlm's training steps with the LM's decoder layers compiled (``train --compile``)
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

    def pixels(self, names: list[str], tower=None) -> torch.Tensor:
        """The images ``names`` preprocessed for ``tower`` (default: the bench's)."""
        from ..data.images import image_path, open_rgb

        return (tower or self.tower).preprocess([open_rgb(image_path(self.images, n)) for n in names])

    def autocast(self):
        """Both contenders in the precision ``auto`` picks on this host (bf16 only where the CPU has it)."""
        from ..runtime import autocast

        return autocast(torch.device("cpu"), "auto")


def make_vlm(env: Env):
    from ..models.lm import attention_for, load_lm
    from ..models.vlm import PhiVLM

    torch.manual_seed(env.cfg.seed)
    lm = load_lm(env.cfg.lm, attention=attention_for(torch.device("cpu"))).requires_grad_(False)
    vlm = PhiVLM(lm, env.tower.hidden_size, env.tower.num_patches, projector="mlp2x_gelu")
    vlm.feature_norm.fit(env.store.get(env.image_names))  # as training does: statistics of the training images
    return vlm
