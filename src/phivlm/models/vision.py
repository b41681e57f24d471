"""Frozen vision towers: images -> (B, tokens, d_vision) patch features of one hidden layer.

The tower type comes from the model's own config (``model_type``), never from its name: a registry
entry says which transformers class loads it, where its encoder layers are, how many leading
non-patch tokens (CLS, registers) to drop and whether other image sizes need
``interpolate_pos_encoding``. Features are ``hidden_states[feature_layer]`` without those tokens,
optionally average-pooled from the patch grid to a smaller square grid (``image_tokens``).

With ``tiles`` = n the image is cut into an n x n grid of tiles, each encoded on its own (the image splitting of
Idefics3 / SmolVLM, without the global view): a tile's tokens see only its own pixels, and tiles with the same
content give the same tokens wherever they are. Tokens are ordered tile by tile, row-major.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PhivlmError
from ..registry import Registry
from . import builtin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerType:
    """How to load and read one family of vision models."""

    model_class: str  # transformers class that loads the vision part of a checkpoint
    layers: str  # dotted path from the model to its ModuleList of encoder layers
    prefix: Callable[[object], int]  # config -> leading non-patch tokens in the hidden states
    interpolate: bool  # other image sizes need forward(interpolate_pos_encoding=True)


TOWER_TYPES: Registry[TowerType] = Registry("vision tower type")
_CLIP = TowerType("CLIPVisionModel", "encoder.layers", lambda c: 1, True)
_SIGLIP = TowerType("SiglipVisionModel", "encoder.layers", lambda c: 0, True)  # no CLS token
_DINOV2 = TowerType("Dinov2Model", "encoder.layer", lambda c: 1, False)  # interpolates on its own
_DINOV2_REG = TowerType("Dinov2WithRegistersModel", "encoder.layer",
                        lambda c: 1 + getattr(c, "num_register_tokens", 0), False)
for _names, _t in ((("clip", "clip_vision_model"), _CLIP), (("siglip", "siglip_vision_model"), _SIGLIP),
                   (("dinov2",), _DINOV2), (("dinov2_with_registers",), _DINOV2_REG)):
    for _n in _names:
        TOWER_TYPES.register(_n)(_t)


def tower_type(config) -> TowerType:
    return TOWER_TYPES.get(config.model_type)


def grid_side(image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise PhivlmError(f"image_tokens must be a square number (4, 9, 16, 49, ...), got {image_tokens}")
    return side


def select_features(hidden: torch.Tensor, prefix: int, pooled_side: int = 0) -> torch.Tensor:
    """One layer's hidden states (B, prefix + g*g, d) -> (B, tokens, d): drop the prefix, pool the grid."""
    patches = hidden[:, prefix:]
    g = math.isqrt(patches.shape[1])
    if not pooled_side or pooled_side == g:
        return patches
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, g, g)
    return F.adaptive_avg_pool2d(grid.float(), pooled_side).flatten(2).transpose(1, 2).to(patches.dtype)


def split_tiles(pixel_values: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B, C, n*s, n*s) -> (B*n*n, C, s, s): each image's n x n tiles, row-major."""
    if tiles <= 1:
        return pixel_values
    b, c, h, _ = pixel_values.shape  # square: the processor crops to image_size x image_size
    s = h // tiles
    x = pixel_values.reshape(b, c, tiles, s, tiles, s).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * tiles * tiles, c, s, s)


def resize_processor(processor, image_size: int) -> None:
    """Make ``processor`` resize (shortest edge) and centre-crop to ``image_size`` pixels."""
    size = getattr(processor, "size", None) or {}
    processor.size = {"shortest_edge": image_size} if "shortest_edge" in size else \
        {"height": image_size, "width": image_size}
    if getattr(processor, "do_center_crop", False):
        processor.crop_size = {"height": image_size, "width": image_size}


def _load_model(path: str, name: str):
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PhivlmError(f"{name}: cannot load vision tower ({str(e).splitlines()[0]})") from None
    try:
        t = tower_type(config)
    except PhivlmError as e:  # e.g. a language model's folder
        raise PhivlmError(f"{name}: cannot load vision tower ({e})") from None
    try:
        return getattr(transformers, t.model_class).from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise PhivlmError(f"{name}: cannot load vision tower ({str(e).splitlines()[0]})") from None


class VisionTower(nn.Module):
    """A frozen vision model + its image processor; always eval mode, no grad.

    Layers after ``feature_layer`` are removed so they are never computed. ``image_size`` (0 = the
    processor's own) sets resize/crop and interpolated position embeddings; ``tiles`` (0 = none) cuts the
    image into tiles x tiles tiles of ``image_size // tiles`` px encoded one by one; ``image_tokens`` (0 = the
    native patch grid) average-pools each tile's grid so that the image has that many tokens. All are part of
    ``identity``.
    """

    def __init__(self, name: str, feature_layer: int = -2, model: nn.Module | None = None,
                 image_size: int = 0, image_tokens: int = 0, tiles: int = 0):
        """``name``: built-in name, hub id or folder (with the image processor); ``model``: an already
        loaded vision model to use instead of loading one from ``name`` (e.g. from an export)."""
        super().__init__()
        from transformers import AutoImageProcessor

        path = builtin.resolve(name)
        self.name = name
        self.random_weights = builtin.is_random_vision(name)
        if self.random_weights:
            log.warning(builtin.RANDOM_VISION_WARNING.format(name=name))
        if model is None:
            model = _load_model(path, name)
        try:  # the PIL backend: identical preprocessing with or without torchvision installed
            self.processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError) as e:
            raise PhivlmError(f"{name}: cannot load image processor ({str(e).splitlines()[0]})") from None
        cfg = model.config
        self.type = tower_type(cfg)
        self.image_size = image_size or _processor_size(self.processor, cfg)
        if image_size:
            resize_processor(self.processor, image_size)
        self.tiles = max(tiles, 1)
        self.tile_size = self.image_size // self.tiles  # pixels the vision model sees at once
        if self.tiles > 1 and (self.image_size % self.tiles or self.tile_size < cfg.patch_size):
            raise PhivlmError(f"{self.image_size} px do not split into {self.tiles}x{self.tiles} tiles of whole "
                              f"{cfg.patch_size}-px patches (image_size must be a multiple of tiles)")
        self.grid = grid = self.tile_size // cfg.patch_size  # side of one tile's native patch grid
        n_tiles = self.tiles ** 2
        if image_tokens and image_tokens % n_tiles:
            raise PhivlmError(f"image_tokens {image_tokens} is not a multiple of the {n_tiles} tiles")
        self.pooled_side = grid_side(image_tokens // n_tiles) if image_tokens else 0
        if self.pooled_side > grid:
            raise PhivlmError(f"image_tokens {image_tokens} exceeds the {grid}x{grid} patch grid of {name} "
                              f"at {self.tile_size} px" + (f" per tile (x {n_tiles} tiles)" if n_tiles > 1 else ""))
        self.tokens_per_tile = (self.pooled_side or grid) ** 2
        self.num_patches = n_tiles * self.tokens_per_tile
        self.prefix = self.type.prefix(cfg)
        self.interpolate = self.type.interpolate and self.tile_size != cfg.image_size
        self.identity = self._identity(model, feature_layer, image_tokens)
        self.keep = feature_layer % (cfg.num_hidden_layers + 1)  # hidden_states has n_layers + 1 entries
        owner, attr = _resolve_attr(model, self.type.layers)
        setattr(owner, attr, getattr(owner, attr)[: self.keep])
        self.model = model.requires_grad_(False).eval()
        self.hidden_size = cfg.hidden_size

    def _identity(self, model, feature_layer: int, image_tokens: int) -> str:
        """Hash of config, preprocessing, feature layer, token grid and weights: other features never match."""
        h = hashlib.sha256()
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        h.update(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
        tiles = f" tiles={self.tiles}" if self.tiles > 1 else ""  # untiled: the identity of older caches
        h.update(f"layer={feature_layer} size={self.image_size} tokens={image_tokens}{tiles}".encode())
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def train(self, mode: bool = True):  # always eval: the tower is frozen
        return super().train(False)

    def preprocess(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # the encoder ends at ``feature_layer``: its output is that layer's hidden state (with no layers left,
        # feature_layer 0, it is the encoder's input). Read from the encoder itself: the model's
        # last_hidden_state may be layer-normed (SigLIP, DINOv2), and transformers records no
        # hidden_states at all for an encoder without layers.
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        encoder, _ = _resolve_attr(self.model, self.type.layers)
        seen: list[torch.Tensor] = []
        handle = encoder.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state))
        try:
            self.model(pixel_values=split_tiles(pixel_values, self.tiles).to(self.model.dtype), **kw)
        finally:
            handle.remove()
        feats = select_features(seen[-1], self.prefix, self.pooled_side)
        return feats.reshape(pixel_values.shape[0], self.num_patches, feats.shape[-1])


def _processor_size(processor, cfg) -> int:
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or cfg.image_size)


def _resolve_attr(obj, dotted: str):
    *parents, attr = dotted.split(".")
    for p in parents:
        obj = getattr(obj, p)
    return obj, attr


def build_tower(model_cfg, model: nn.Module | None = None) -> VisionTower:
    """The tower a run's ``ModelConfig`` names, with its feature layer, image size and token grid."""
    return VisionTower(model_cfg.vision, model_cfg.feature_layer, model=model, image_size=model_cfg.image_size,
                       image_tokens=model_cfg.image_tokens, tiles=model_cfg.image_tiles)
