"""The frozen CLIP vision tower: images -> (B, patches, d_vision) penultimate-layer patch features."""
from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from ..registry import PhivlmError
from . import builtin

log = logging.getLogger(__name__)


class VisionTower(nn.Module):
    """Wraps ``CLIPVisionModel`` + ``CLIPImageProcessor``; always frozen, eval mode, no grad.

    Features are the hidden states of ``feature_layer`` with the CLS token dropped; layers after it
    are removed so they are never computed.
    """

    def __init__(self, name: str, feature_layer: int = -2, model: nn.Module | None = None):
        """``name``: built-in name, hub id or folder (with the image processor); ``model``: an already
        loaded ``CLIPVisionModel`` to use instead of loading one from ``name`` (e.g. from an export)."""
        super().__init__()
        from transformers import CLIPVisionModel

        try:  # the PIL backend: identical preprocessing with or without torchvision installed
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        path = builtin.resolve(name)
        self.name = name
        self.random_weights = builtin.is_random_vision(name)
        if self.random_weights:
            log.warning(builtin.RANDOM_VISION_WARNING.format(name=name))
        try:
            if model is None:
                model = CLIPVisionModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
            self.processor = CLIPImageProcessor.from_pretrained(path)
        except OSError as e:
            raise PhivlmError(f"{name}: cannot load vision tower ({str(e).splitlines()[0]})") from None
        self.identity = self._identity(model, feature_layer)
        n_layers = model.config.num_hidden_layers
        self.keep = feature_layer % (n_layers + 1)  # hidden_states has n_layers + 1 entries
        encoder = getattr(model, "vision_model", model).encoder  # transformers 5 flattened vision_model
        encoder.layers = encoder.layers[: self.keep]
        self.model = model.requires_grad_(False).eval()
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2

    def _identity(self, model, feature_layer: int) -> str:
        """Hash of config, preprocessing, feature layer and weights: features of another tower never match."""
        h = hashlib.sha256()
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        h.update(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
        h.update(str(feature_layer).encode())
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
        # the encoder ends at ``feature_layer``, so its last hidden state is that layer's (with no layers
        # left, feature_layer 0, it is the encoder's input: the normalised patch + position embeddings)
        out = self.model(pixel_values=pixel_values.to(self.model.dtype))
        return out.last_hidden_state[:, 1:]
