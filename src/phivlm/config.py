"""Typed run configuration: dataclasses, loadable from YAML, overridable by command-line flags.

Each section's fields become flat flags (``--lr``, ``--batch-size``) whose help and choices come from the
field's metadata; precedence is defaults < ``--config file.yaml`` < flags. ``RunConfig.validate`` refuses values
no run can take. Every run writes the resolved config next to its outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import PhivlmError

# the fixed sets of names, defined here and imported where they are used
PRECISIONS = ("auto", "bf16", "fp32", "fp16")
LM_TUNINGS = ("frozen", "lora", "qlora", "full")
FSDP_MODES = ("none", "full", "grad-op")
FEEDBACK = ("greedy", "sample")
LR_SCHEDULES = ("cosine", "constant")
TILE_MARKERS = ("before", "after")


def opt(default, help: str, choices: tuple[str, ...] = (), names: tuple[str, ...] = (), kind: str = ""):
    """A config field with its ``--help`` text. ``choices``: a fixed set of valid values, checked by
    ``RunConfig.validate`` ("unknown ``kind`` (default: the flag) ..."); ``names``: the names of a registry,
    listed so that --help needs no torch import (the registry checks them, and also knows names registered
    at run time; tests/test_cli_help.py checks the list against it). Both are shown in --help."""
    return field(default=default, metadata={"help": help, "choices": choices or names, "fixed": bool(choices),
                                            "kind": kind})


@dataclass
class ModelConfig:
    vision: str = opt("dinov2-small", "vision tower: a built-in name (dinov2-small, clip-vit-b32, tiny-clip, "
                      "tiny-siglip, tiny-dinov2), a hub id or a local folder")
    feature_layer: int = opt(-2, "hidden-state index used as image features (-2: the penultimate layer)")
    image_size: int = opt(0, "pixels the tower sees (resize + crop, interpolated position embeddings); "
                          "0 = the tower's own")
    image_tokens: int = opt(0, "image tokens per image: the patch grid average-pooled to a square number "
                            "(per tile, with --image-tiles; 0 = every patch)")
    image_tiles: int = opt(0, "cut each image into an N x N grid of tiles encoded one by one at image-size / N px, "
                           "each tile's tokens after a text marker saying where it lies (0 = the whole image)")
    tile_markers: str = opt("before", "where each tile's text marker goes: before the tile's image tokens, or "
                            "after them, where the marker can take in what its tile shows", TILE_MARKERS)
    lm: str = opt("smollm2-135m", "language model: a built-in name (smollm2-135m, tiny-phi, tiny-llama), "
                  "a hub id or a local folder")
    projector: str = opt("residual", "projector from image features to LM embeddings",
                         names=("linear", "mlp2x_gelu", "residual"))
    projector_depth: int = opt(2, "residual blocks of the residual projector")
    slot_embedding: bool = opt(False, "add a learned vector per image-token slot to the projected tokens, scaled "
                               "by each token's size: where a token lies (with --image-tiles, its tile) becomes "
                               "part of the token")
    trust_remote_code: bool = opt(False, "allow an LM that needs trust_remote_code to run its own Python code")


@dataclass
class DataConfig:
    data: str = opt("", "annotation file: COCO captions JSON or LLaVA conversations JSON")
    images: str = opt("", "image folder")
    val_data: str = opt("", "optional validation annotation file (same format)")
    features: str = opt(".cache/features", "feature-cache root; one sub-folder per vision tower")
    limit: int = opt(0, "seeded random subset of this many images (0 = all)")
    template: str = opt("plain", "prompt template; auto: the tokenizer's chat template if it has one, else phi",
                        names=("auto", "chat", "phi", "plain"))
    max_length: int = opt(256, "text tokens per sample (image tokens not counted)")
    skip_bad: bool = opt(False, "skip (and log) bad samples instead of failing")


@dataclass
class TrainConfig:
    output: str = opt("runs/stage1", "run folder: checkpoint, config.yaml, logs")
    epochs: float = opt(1.0, "passes over the training data")
    max_steps: int = opt(0, "optimizer steps; > 0 overrides --epochs")
    batch_size: int = opt(8, "samples per process and micro-batch; global batch = batch size x processes x "
                          "grad accum")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    group_by_length: bool = opt(False, "batch samples of similar length together (less padding)")
    compile: bool = opt(False, "torch.compile each LM decoder layer (fused element-wise work: CPU steps ~1.3x "
                        "faster after ~40 s of compiling; needs a C++ compiler on the CPU)")
    fsdp: str = opt("none", "none: DDP; full: shard parameters, gradients and optimizer state (ZeRO-3); grad-op: "
                    "shard gradients and optimizer state (ZeRO-2)", FSDP_MODES)
    lr: float = opt(1e-3, "learning rate of the projector and separator")
    lm_lr: float = opt(2e-4, "learning rate of the LoRA adapters or LM weights")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.03, "share of the steps spent warming the learning rate up (then --lr-schedule)")
    lr_schedule: str = opt("cosine", "after warm-up: cosine decay to zero, or constant", LR_SCHEDULES)
    grad_clip: float = opt(1.0, "gradient norm clipped to this")
    seed: int = opt(0, "seed of data order, subsets and initialisation")
    precision: str = opt("auto", "auto: bf16 where the hardware has it, else fp32; fp16: GPU only", PRECISIONS,
                         kind="precision")
    device: str = opt("auto", "auto (a GPU if there is one), cpu, cuda or cuda:N")
    log_every: int = opt(10, "log the training loss every N steps")
    eval_every: int = opt(0, "validation loss on --val-data every N steps (0 = only at the end)")
    workers: int = opt(0, "DataLoader worker processes")
    save_every: int = opt(0, "resumable checkpoint every N steps in <output>/checkpoints (0 = only at the end)")
    keep_last: int = opt(2, "periodic checkpoints kept")
    resume: str = opt("auto", "auto: the latest in <output>/checkpoints, if any; none; or a step-checkpoint "
                      "folder")
    skip_nonfinite: bool = opt(False, "skip (and count) batches with a non-finite loss instead of stopping")
    objective: str = opt("standard", "training objective (see README, \"Training objectives\")",
                         names=("autoregressive", "mixed", "standard"))
    tf_schedule: str = opt("exponential", "teacher-forcing rate over the steps",
                           names=("constant", "exponential", "linear"))
    tf_start: float = opt(1.0, "teacher-forcing rate at step 0 (1 = always feed the ground-truth token)")
    tf_end: float = opt(0.5, "floor the teacher-forcing rate decays to")
    tf_decay_steps: int = opt(0, "linear reaches --tf-end here; exponential is 99% of the way (0 = the whole run)")
    feedback: str = opt("greedy", "model token fed back when not teacher-forcing", FEEDBACK)
    mixed_standard_fraction: float = opt(0.5, "mixed objective: share of steps using the standard objective")


@dataclass
class TuningConfig:
    lm_tuning: str = opt("frozen", "how the LM is trained: frozen, LoRA adapters, QLoRA (4-bit NF4 base) or fully",
                         LM_TUNINGS)
    lora_rank: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA adapters' input")
    lora_targets: str = opt("", "comma-separated module names LoRA adapts; empty = the architecture's default")
    gradient_checkpointing: bool = opt(False, "recompute LM activations in the backward pass (less memory, "
                                       "slower)")


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

    def validate(self) -> None:
        """Fail, before any loading, on values no run can take: a name outside a fixed set, a rate outside
        [0, 1], a combination --fsdp cannot train. (Registry names are checked by their registries.)"""
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub):
                value, meta = getattr(sub, f.name), f.metadata
                if meta["fixed"] and value not in meta["choices"]:
                    raise PhivlmError(f"unknown {meta['kind'] or _flag(f.name)} {value!r}; "
                                      f"valid: {', '.join(meta['choices'])}")
        t = self.train
        for name in ("tf_start", "tf_end", "mixed_standard_fraction"):
            if not 0.0 <= getattr(t, name) <= 1.0:
                raise PhivlmError(f"{_flag(name)} must be in [0, 1], got {getattr(t, name)}")
        if t.tf_decay_steps < 0:
            raise PhivlmError(f"--tf-decay-steps must be >= 0, got {t.tf_decay_steps}")
        if t.compile and (t.fsdp != "none" or self.tuning.lm_tuning == "qlora" or t.objective != "standard"
                          or self.tuning.gradient_checkpointing):
            raise PhivlmError("--compile trains with --objective standard, without --fsdp, qlora or "
                              "--gradient-checkpointing (the combinations it was checked with)")
        if t.fsdp != "none":
            if self.tuning.lm_tuning == "qlora":
                raise PhivlmError("--fsdp cannot shard QLoRA's 4-bit bitsandbytes weights; use --lm-tuning lora "
                                  "with --fsdp, or qlora without it")
            if t.objective != "standard":
                raise PhivlmError(f"--fsdp needs --objective standard: {t.objective} decodes a data-dependent "
                                  "number of steps per batch, which sharded processes cannot keep in step (use it "
                                  "without --fsdp)")
            if t.precision == "fp16":
                raise PhivlmError("--fsdp trains in bf16 or fp32 (fp16 loss scaling over shards is not supported); "
                                  "use --precision bf16")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(_read_yaml(path), str(path))


# what each training stage starts from, over the dataclass defaults (which are stage 1's: runs/stage1, the plain
# template, the LM frozen); the one definition of the stage presets
STAGES = {
    "pretrain": {},
    "finetune": {"train": {"output": "runs/stage2", "lr": 2e-4, "lm_lr": 2e-4}, "data": {"template": "auto"},
                 "tuning": {"lm_tuning": "lora"}},
}


def stage_defaults(stage: str) -> RunConfig:
    """The defaults of ``phivlm pretrain`` (stage 1) or ``phivlm finetune`` (stage 2)."""
    return RunConfig.from_dict(STAGES[stage], f"{stage} preset")


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


def _shown(default) -> str:
    return repr(default) if default == "" else str(default)


def add_config_args(parser: argparse.ArgumentParser, defaults: RunConfig, only: tuple[str, ...] = ()) -> None:
    """Add ``--config`` and one flag per config field (default None, so set flags are known), its help and
    choices from the field's metadata; ``only``: just these fields ("section.name")."""
    parser.add_argument("--config", metavar="YAML", help="YAML file with model/data/train/tuning sections "
                                                         "(flags override it)")
    for section in dataclasses.fields(RunConfig):
        sub = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(sub))
        chosen = [f for f in dataclasses.fields(sub) if not only or f"{section.name}.{f.name}" in only]
        group = parser.add_argument_group(section.name) if chosen else None
        for f in chosen:
            default, typ, choices = getattr(sub, f.name), hints[f.name], f.metadata["choices"]
            text = f"{f.metadata['help']} (default: {_shown(default)})".replace("%", "%%")
            dest = f"{section.name}.{f.name}"
            if typ is bool:
                group.add_argument(_flag(f.name), dest=dest, default=None, action=argparse.BooleanOptionalAction,
                                   help=text)
            else:  # choices shown, not enforced here: validation names the valid values for YAML and flags alike
                metavar = "{" + ",".join(choices) + "}" if choices else typ.__name__.upper()
                group.add_argument(_flag(f.name), dest=dest, default=None, type=typ, metavar=metavar, help=text)


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
