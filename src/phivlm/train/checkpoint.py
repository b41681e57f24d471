"""Writing checkpoints (atomically; the format is read by ``phivlm.loading.checkpoint``), and merging a
LoRA/QLoRA checkpoint into a full one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..config import RunConfig
from ..errors import PhivlmError
from ..folders import atomic_folder
from ..loading.checkpoint import PROJECTOR_FILE, checkpoint_config, load_merged, resolve_checkpoint
from ..models.vlm import PhiVLM


def save_checkpoint(vlm: PhiVLM, cfg: RunConfig, tok, out: str | Path, state: dict | None = None,
                    extra: Callable[[Path], None] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically: into a temporary folder, fsync, then rename into place.

    ``extra`` writes more files into the folder before it is committed (e.g. the training state).
    ``weights``: tensors to write instead of the model's own, keyed as in ``vlm.state_dict()`` (the trainable
    parameters and the buffers at least), e.g. gathered from FSDP shards."""
    own = vlm.trainable_state_dict()
    lm_weights = None  # None: the LM's own
    if weights is not None:
        own = {k: weights[k] for k in own}
        lm_weights = {k.removeprefix("lm."): v for k, v in weights.items() if k.startswith("lm.")}
        first: dict[int, str] = {}  # tied parameters (embeddings = LM head) come as copies: share them again,
        for name, p in vlm.lm.named_parameters(remove_duplicate=False):  # so save_pretrained sees them tied
            if name in lm_weights:
                lm_weights[name] = lm_weights[first.setdefault(id(p), name)]
    with atomic_folder(out) as tmp:
        cfg.save(tmp / "config.yaml")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in own.items()}, str(tmp / PROJECTOR_FILE))
        if cfg.tuning.lm_tuning in ("lora", "qlora"):
            vlm.lm.save_pretrained(tmp / "adapter", state_dict=lm_weights)
        elif cfg.tuning.lm_tuning == "full":
            vlm.base_lm.save_pretrained(tmp / "lm", state_dict=lm_weights)
            tok.save_pretrained(tmp / "lm")
        (tmp / "state.json").write_text(json.dumps(state or {}, indent=1))
        if extra is not None:
            extra(tmp)
    return Path(out)


def merge_checkpoint(path: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA/QLoRA checkpoint into a standalone full checkpoint (LM weights in ``lm/``)."""
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt, trust_remote_code)
    if cfg.tuning.lm_tuning not in ("lora", "qlora"):
        raise PhivlmError(f"{ckpt}: nothing to merge (lm_tuning is {cfg.tuning.lm_tuning!r})")
    merged = load_merged(ckpt, trust_remote_code)
    return save_checkpoint(merged.vlm, merged.cfg, merged.tok, out, {"merged_from": str(ckpt)})
