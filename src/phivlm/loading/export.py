"""Reading a ``phivlm export`` folder back as phivlm's own model (``phivlm.export`` writes it).

The marker ``phivlm_export.json`` (format, token ids, the run config) tells an export from a checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import PhivlmError
from ..hf.formats import FORMATS
from ..models import builtin
from ..models.lm import load_tokenizer
from ..models.vision import VisionTower
from ..models.vlm import PhiVLM
from . import Loaded

log = logging.getLogger(__name__)
MARKER = "phivlm_export.json"


def is_export(path: str | Path) -> bool:
    p = Path(path)
    return (p / MARKER).is_file() and (p / "config.json").is_file()


def load_export(path: str | Path, device: torch.device | str = "cpu") -> Loaded:
    """An exported folder as phivlm's own model (fp32, eval mode): what ``load_checkpoint`` returns."""
    from transformers import AutoModelForImageTextToText

    from ..hf import register

    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
        cfg = RunConfig.from_dict(meta["config"], str(path / MARKER))
        fmt = FORMATS.get(meta["format"])()
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise PhivlmError(f"{path / MARKER}: unreadable export marker ({type(e).__name__})") from None
    register()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    lm, vision, projector_state, separator = fmt.unpack(model, meta)
    tower = VisionTower(str(path), cfg.model.feature_layer, model=vision, image_size=cfg.model.image_size,
                        image_tokens=cfg.model.image_tokens, tiles=cfg.model.image_tiles)
    own = (tower.prefix, tower.pooled_side if tower.pooled_side != tower.grid else 0, tower.interpolate,
           tower.tiles if tower.tiles > 1 else 0)
    if fmt.selection(model) != own:
        raise PhivlmError(f"{path}: the model reads its image features as (prefix, pooled grid, interpolation, "
                          f"tiles) "
                          f"{fmt.selection(model)}, its phivlm config as {own}")
    tower.random_weights = builtin.is_random_vision(cfg.model.vision)
    if tower.random_weights:
        log.warning(builtin.RANDOM_VISION_WARNING.format(name=cfg.model.vision))
    vlm = PhiVLM(lm, tower.hidden_size, tower.num_patches, cfg.model.projector, cfg.model.projector_depth,
                 cfg.model.slot_embedding)
    with torch.no_grad():
        vlm.projector.load_state_dict(projector_state)
        vlm.separator.copy_(separator)
    device = torch.device(device)
    tok = load_tokenizer(str(path))
    tok.chat_template = meta.get("lm_chat_template")  # phivlm's templates insert the image themselves
    return Loaded(vlm.float().to(device).eval(), tok, tower.to(device), cfg)
