"""Reading checkpoints: find one, assemble its model from its config (+ its weights), load it for inference.

A checkpoint folder holds ``config.yaml`` (the resolved run config), ``projector.safetensors``
(projector + separator), and ``adapter/`` (PEFT LoRA) or ``lm/`` (full or merged LM weights and
tokenizer). A run writes its final checkpoint to ``<output>/checkpoint``; commands taking
``--checkpoint`` accept either folder. ``phivlm.train.checkpoint`` writes them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..errors import PhivlmError
from ..folders import recover
from ..models.lm import attention_for, load_lm, load_tokenizer
from ..models.vision import build_tower
from ..models.vlm import PhiVLM
from . import Loaded
from .export import is_export, load_export
from .tuning import apply_tuning, quantization_config

PROJECTOR_FILE = "projector.safetensors"


# What a checkpoint holds by its own lm_tuning; without it a fresh adapter or the base LM would load silently.
LM_WEIGHTS = {"lora": "adapter/adapter_config.json", "qlora": "adapter/adapter_config.json", "full": "lm/config.json"}


def _check_lm_weights(ckpt: Path) -> None:
    need = LM_WEIGHTS.get(RunConfig.load(ckpt / "config.yaml").tuning.lm_tuning)
    if need and not (ckpt / need).is_file():
        raise PhivlmError(f"{ckpt}: not a complete checkpoint ({need} missing)")


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        recover(cand)  # a save interrupted between its two renames left the previous checkpoint aside
        if (cand / PROJECTOR_FILE).is_file() and (cand / "config.yaml").is_file():
            _check_lm_weights(cand)
            return cand
    if not p.exists():
        raise PhivlmError(f"{p}: checkpoint folder not found")
    q = p / "checkpoint" if (p / "checkpoint").is_dir() else p
    missing = " and ".join(f for f in (PROJECTOR_FILE, "config.yaml") if not (q / f).is_file())
    raise PhivlmError(f"{q}: not a checkpoint ({missing} missing)")


def build_vlm(cfg: RunConfig, d_vision: int, n_patches: int, device: torch.device,
              init: Path | None = None, trainable: bool = True, quantize: bool = True,
              computes_on: torch.device | None = None):
    """The model described by ``cfg``, built on ``device``; weights from checkpoint ``init`` where it has them. The
    LM's attention kernel is the one for ``computes_on`` (default: ``device``)."""
    cfg.validate()  # also a checkpoint's config, read from its folder
    lm_source = str(init / "lm") if init is not None and (init / "lm").is_dir() else cfg.model.lm
    tok = load_tokenizer(lm_source, cfg.model.trust_remote_code)
    qcfg = quantization_config(cfg.tuning) if quantize else None
    lm = load_lm(lm_source, trust_remote_code=cfg.model.trust_remote_code, quantization_config=qcfg,
                 device_map={"": device} if qcfg is not None else None,
                 attention=attention_for(computes_on or device))
    adapter = init / "adapter" if init is not None and (init / "adapter").is_dir() else None
    if adapter is not None and cfg.tuning.lm_tuning not in ("lora", "qlora"):
        raise PhivlmError(f"{init}: holds a LoRA adapter but --lm-tuning is {cfg.tuning.lm_tuning!r}")
    lm = apply_tuning(lm, cfg.tuning, str(adapter) if adapter else None, trainable)
    vlm = PhiVLM(lm, d_vision, n_patches, cfg.model.projector, cfg.model.projector_depth,
                 cfg.model.slot_embedding)
    if init is not None:
        load_projector(vlm, init)
    return vlm.to(device), tok


def load_projector(vlm: PhiVLM, ckpt: Path) -> None:
    path = ckpt / PROJECTOR_FILE
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise PhivlmError(f"{path}: not a valid safetensors file ({(str(e) or type(e).__name__).splitlines()[0]}); "
                          "weights are read from safetensors only, never unpickled") from None
    own = vlm.trainable_state_dict()
    if set(sd) != set(own):
        raise PhivlmError(f"{path}: projector tensors do not match the configured projector "
                          f"({sorted(set(sd) ^ set(own))[:3]} ...)")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise PhivlmError(f"{path}: tensor {k} has shape {tuple(v.shape)} but the model needs "
                              f"{tuple(own[k].shape)}: checkpoint from another LM/vision tower? "
                              f"(LM hidden size here: {vlm.separator.numel()}, "
                              f"in checkpoint: {sd['separator'].numel()})")
    with torch.no_grad():
        vlm.separator.copy_(sd.pop("separator"))
        vlm.feature_norm.load_state_dict({k.removeprefix("feature_norm."): sd.pop(k) for k in list(sd)
                                          if k.startswith("feature_norm.")})
        vlm.projector.load_state_dict({k.removeprefix("projector."): v for k, v in sd.items()})


def checkpoint_config(ckpt: Path, trust_remote_code: bool = False) -> RunConfig:
    """A checkpoint's run config. Remote code runs only when the command being run allows it: a checkpoint
    that asks for ``trust_remote_code`` itself (its LM would run Python shipped with it) is refused."""
    cfg = RunConfig.load(ckpt / "config.yaml")
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise PhivlmError(f"{ckpt}: this checkpoint asks for trust_remote_code (its language model would run "
                          "Python code shipped with it); pass --trust-remote-code if you trust its source")
    return cfg


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", trainable: bool = False,
                    trust_remote_code: bool = False) -> Loaded:
    """Everything needed for inference from a checkpoint folder (or a ``phivlm export`` folder), in a fresh process."""
    recover(Path(path))
    if is_export(path):
        return load_export(path, device)
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt, trust_remote_code)
    device = torch.device(device)
    tower = build_tower(cfg.model).to(device)
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, device, init=ckpt, trainable=trainable)
    vlm.train(trainable)
    return Loaded(vlm, tok, tower, cfg)


def load_merged(path: str | Path, trust_remote_code: bool = False) -> Loaded:
    """A checkpoint on the CPU in eval mode with its LoRA/QLoRA adapter merged into the LM (``lm_tuning``
    becomes ``full``). QLoRA adapters merge into the unquantised base weights."""
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt, trust_remote_code)
    tower = build_tower(cfg.model)
    vlm, tok = build_vlm(cfg, tower.hidden_size, tower.num_patches, torch.device("cpu"), init=ckpt,
                         trainable=False, quantize=False)
    if cfg.tuning.lm_tuning in ("lora", "qlora"):
        vlm.lm = vlm.lm.merge_and_unload()
        cfg.tuning.lm_tuning = "full"
    vlm.eval()
    return Loaded(vlm, tok, tower, cfg)
