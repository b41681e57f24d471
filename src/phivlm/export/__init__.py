"""``phivlm export``: a checkpoint -> a Hugging Face model folder that ``transformers`` loads (and
``phivlm.loading.export`` reads back).

The folder holds the model (``config.json`` + safetensors, LoRA merged), the processor (the vision tower's
image processor, LM tokenizer with ``<image>`` and ``<image_sep>``, chat template), ``generation_config.json``
(phivlm's defaults: greedy, 64 new tokens, its EOS; the image tokens suppressed), a model card
(``README.md``) and the marker ``phivlm_export.json`` (format, token ids, the run config) by which
phivlm's own loaders recognise an export.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from .. import __version__
from ..config import RunConfig
from ..data.templates import image_slots, resolve_template_name
from ..folders import atomic_folder
from ..models import builtin
from ..errors import PhivlmError
from ..hf.formats import FORMATS, Parts
from ..loading import Loaded
from ..loading.checkpoint import load_merged, resolve_checkpoint
from ..loading.export import MARKER, is_export
from ..models.vision import VisionTower
from .card import find_metrics, model_card
from .processor import SEP_TOKEN, add_image_tokens, build_processor, check_prompts

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_format(name: str, parts: Parts) -> str:
    """``auto``: Llava where it holds the model exactly, else phivlm's own format."""
    if name == "auto":
        reason = FORMATS.get("llava")().unsupported(parts)
        if reason:
            log.info("exporting in the phivlm format: %s", reason)
        return "phivlm" if reason else "llava"
    reason = FORMATS.get(name)().unsupported(parts)
    if reason:
        raise PhivlmError(f"cannot export as {name!r}: {reason}")
    return name


def _generation_config(tok, img: int, sep: int):
    """phivlm's decoding defaults (greedy, 64 new tokens, stop at the tokenizer's EOS)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, suppress_tokens=[img, sep])


def export(checkpoint: str | Path, out: str | Path, fmt: str = "auto", dtype: str = "fp32",
           metrics: str | Path | None = None) -> Path:
    """Write checkpoint ``checkpoint`` as a Hugging Face model folder ``out`` (atomically); returns ``out``.
    ``metrics``: ``phivlm eval``'s metrics.json for the model card (default: found next to the checkpoint)."""
    ckpt, out = resolve_checkpoint(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise PhivlmError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise PhivlmError(f"{out}: exists and is not a phivlm export; refusing to overwrite it")
    run_cfg = RunConfig.load(ckpt / "config.yaml")
    found_metrics = find_metrics(ckpt, metrics)
    if run_cfg.model.trust_remote_code:
        raise PhivlmError(f"{ckpt}: the LM needs trust_remote_code; export needs an architecture built into "
                          "transformers")
    loaded = load_merged(ckpt)
    cfg = loaded.cfg
    cfg.data.template = resolve_template_name(cfg.data.template, loaded.tok)
    processor, parts = _assemble(loaded)
    name = pick_format(fmt, parts)
    model = FORMATS.get(name)().build(parts).to(DTYPES[dtype])
    model.generation_config = _generation_config(processor.tokenizer, parts.image_token_id, parts.image_sep_token_id)
    example = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True)
    meta = {"phivlm_version": __version__, "format": name, "source": str(ckpt), "dtype": dtype,
            "lm_vocab_size": parts.lm_vocab_size, "image_token_id": parts.image_token_id,
            "image_sep_token_id": parts.image_sep_token_id, "image_sep_token": SEP_TOKEN,
            "lm_chat_template": loaded.tok.chat_template, "config": cfg.to_dict()}

    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card = model_card(cfg, name, ckpt, run_cfg.tuning.lm_tuning, example, found_metrics, parts)
        (tmp / "README.md").write_text(card)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))  # last: only complete exports carry it
    log.info("exported %s (%s format) to %s", ckpt, name, out)
    return out


def vision_parts(tower: VisionTower, vision) -> dict:
    """The ``Parts`` fields that say how phivlm reads ``vision`` (``tower``'s model with all its layers)."""
    return {"vision": vision, "prefix": tower.prefix, "image_size": tower.image_size,
            "grid": tower.grid, "pooled_side": tower.pooled_side,
            "interpolate": tower.interpolate, "num_image_tokens": tower.num_patches, "tiles": tower.tiles}


def _assemble(loaded: Loaded):
    """(processor, parts) of a merged checkpoint; fails unless the processor gives phivlm's prompt ids."""
    import transformers

    cfg, vlm, tower = loaded.cfg, loaded.vlm, loaded.tower
    tok = copy.deepcopy(loaded.tok)
    img, sep = add_image_tokens(tok)
    # all layers (the tower's model stops at the feature layer), through the tower type's own class
    vision = getattr(transformers, tower.type.model_class).from_pretrained(
        builtin.resolve(cfg.model.vision), dtype=torch.float32, use_safetensors=True)
    vlm.fold_feature_norm()  # the exported projector takes the tower's raw features
    parts = Parts(lm=vlm.base_lm, projector=vlm.projector, separator=vlm.separator.detach(),
                  projector_name=cfg.model.projector, projector_depth=cfg.model.projector_depth,
                  markers_after=cfg.model.tile_markers == "after",
                  feature_layer=cfg.model.feature_layer, image_token_id=img, image_sep_token_id=sep,
                  **vision_parts(tower, vision))
    slots = image_slots(loaded.tok, tower.num_patches, tower.tiles, cfg.model.tile_markers)
    processor = build_processor(tok, tower.processor, cfg.data.template, parts)
    check_prompts(processor, loaded.tok, cfg.data.template, slots, tower.image_size)
    return processor, parts
