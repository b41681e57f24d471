"""Typed run configuration: dataclasses, loadable from YAML, overridable by command-line flags.

Each section's fields become flat flags (``--lr``, ``--batch-size``); precedence is
defaults < ``--config file.yaml`` < flags. Every run writes the resolved config next to its outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .registry import PhivlmError


@dataclass
class ModelConfig:
    vision: str = "dinov2-small"  # built-in name (dinov2-small, clip-vit-b32), hub id or local folder
    feature_layer: int = -2  # hidden-state index used as image features (penultimate layer)
    image_size: int = 0  # pixels the tower sees (resize + crop, interpolated position embeddings); 0 = its own
    image_tokens: int = 0  # image tokens per image: the patch grid average-pooled to a square (0 = every patch)
    lm: str = "smollm2-135m"  # built-in name, hub id or local folder
    projector: str = "residual"  # linear | mlp2x_gelu | residual
    projector_depth: int = 2  # residual blocks of the residual projector
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    data: str = ""  # annotation file: COCO captions JSON or LLaVA conversations JSON
    images: str = ""  # image folder
    val_data: str = ""  # optional validation annotation file (same format)
    features: str = ".cache/features"  # feature-cache root; one sub-folder per vision tower
    limit: int = 0  # seeded random subset of images (0 = all)
    template: str = "plain"  # plain | phi | chat | auto (chat if the tokenizer has one, else phi)
    max_length: int = 256  # text tokens per sample (image tokens not counted)
    skip_bad: bool = False  # skip (and log) bad samples instead of failing


@dataclass
class TrainConfig:
    output: str = "runs/stage1"
    epochs: float = 1.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 8  # per process and micro-batch; global batch = batch_size x processes x grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step
    group_by_length: bool = False  # batch samples of similar length together (less padding)
    fsdp: str = "none"  # none (DDP) | full (shard params, grads, optimizer state: ZeRO-3) | grad-op (ZeRO-2)
    lr: float = 1e-3  # projector + separator
    lm_lr: float = 2e-4  # LoRA adapters / LM weights
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp32 | fp16 (GPU only)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 0  # validation loss on --val-data every N steps (0 = only at the end)
    workers: int = 0  # DataLoader worker processes
    save_every: int = 0  # resumable checkpoint every N steps in <output>/checkpoints (0 = only at the end)
    keep_last: int = 2  # periodic checkpoints kept
    resume: str = "auto"  # auto (latest in <output>/checkpoints, if any) | none | a step-checkpoint folder
    skip_nonfinite: bool = False  # skip (and count) batches with a non-finite loss instead of stopping
    objective: str = "standard"  # standard | autoregressive | mixed (see README, "Training objectives")
    tf_schedule: str = "exponential"  # teacher-forcing rate over steps: constant | linear | exponential
    tf_start: float = 1.0  # teacher-forcing rate at step 0 (1 = always feed the ground-truth token)
    tf_end: float = 0.5  # floor the rate decays to
    tf_decay_steps: int = 0  # linear reaches tf_end here; exponential is 99% of the way (0 = the whole run)
    feedback: str = "greedy"  # model token fed back when not teacher-forcing: greedy | sample
    mixed_standard_fraction: float = 0.5  # mixed: share of steps using the standard objective


@dataclass
class TuningConfig:
    lm_tuning: str = "frozen"  # frozen | lora | qlora | full
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = ""  # comma-separated module names; empty = per-architecture default
    gradient_checkpointing: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        cfg = cls()
        for section, values in (d or {}).items():
            if not hasattr(cfg, section) or not isinstance(values, dict):
                raise PhivlmError(f"{source}: unknown config section {section!r}")
            sub = getattr(cfg, section)
            for k, v in values.items():
                if not hasattr(sub, k):
                    raise PhivlmError(f"{source}: unknown key {section}.{k}")
                setattr(sub, k, _coerce(type(getattr(sub, k)), v, f"{source}: {section}.{k}"))
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(_read_yaml(path), str(path))


def _read_yaml(path: str | Path) -> dict:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PhivlmError(f"{path}: cannot read config ({e.__class__.__name__})") from None
    if d is not None and not isinstance(d, dict):
        raise PhivlmError(f"{path}: expected a mapping of sections (model, data, train, tuning)")
    return d or {}


def _coerce(typ: type, v, name: str):
    try:
        if typ is bool and isinstance(v, str):
            return v.lower() in ("1", "true", "yes", "on")
        return typ(v)
    except (TypeError, ValueError):
        raise PhivlmError(f"{name}: expected {typ.__name__}, got {v!r}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Add ``--config`` and one flag per config field (default None, so set flags are known)."""
    parser.add_argument("--config", help="YAML file with model/data/train/tuning sections")
    for section in dataclasses.fields(RunConfig):
        group = parser.add_argument_group(section.name)
        sub = getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            typ = typing.get_type_hints(type(sub))[f.name]
            if typ is bool:
                group.add_argument(_flag(f.name), dest=f"{section.name}.{f.name}", default=None,
                                   action=argparse.BooleanOptionalAction, help=f"(default: {default})")
            else:
                group.add_argument(_flag(f.name), dest=f"{section.name}.{f.name}", default=None, type=typ,
                                   metavar=typ.__name__.upper(), help=f"(default: {default!r})")


def config_from_args(args: argparse.Namespace, defaults: RunConfig, base: RunConfig | None = None) -> RunConfig:
    """defaults < base (e.g. a checkpoint's config) < --config YAML < explicit flags."""
    cfg = RunConfig.from_dict((base or defaults).to_dict())
    if getattr(args, "config", None):
        cfg = RunConfig.from_dict(_merge(cfg.to_dict(), _read_yaml(args.config)), args.config)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
