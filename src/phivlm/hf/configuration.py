"""``PhivlmConfig``: a vision config (CLIP, SigLIP, DINOv2, ...), a causal-LM config and phivlm's projector and
feature-selection settings."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class PhivlmConfig(PreTrainedConfig):
    """Model type ``phivlm``. Token ids ``image_token_id`` / ``image_sep_token_id`` may lie outside the LM
    vocabulary: they are never looked up, their slots get the projected patches and the separator.

    ``vision_config`` is any vision model ``transformers`` builds with ``AutoModel`` (its ``model_type`` says
    which: ``clip_vision_model``, the default, ``siglip_vision_model``, ``dinov2``, ``dinov2_with_registers``).
    Image features are phivlm's (``phivlm.models.vision.select_features``): hidden states of
    ``vision_feature_layer`` without their ``vision_prefix_tokens`` leading non-patch tokens (CLS, registers),
    average-pooled to an ``image_grid_side`` x ``image_grid_side`` grid (0: the native patch grid), the vision
    model run with ``interpolate_pos_encoding`` where set; with ``image_tiles`` = n > 1 the image is first cut into
    n x n tiles encoded one by one (``phivlm.models.vision.split_tiles``), their tokens concatenated tile by tile.
    The defaults are those of exports made before these settings existed (CLIP: CLS dropped, no pooling, native
    image size, no tiles)."""

    model_type = "phivlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector: str = "residual"  # a name in phivlm.models.projector.PROJECTORS
    projector_depth: int = 2
    slot_embedding: bool = False  # a learned vector per image-token slot after the projector (SlotEmbedding)
    vision_feature_layer: int = -2  # hidden-state index
    vision_prefix_tokens: int = 1  # leading non-patch tokens dropped (CLIP/DINOv2: CLS = 1; SigLIP: 0; + registers)
    image_grid_side: int = 0  # patch grid average-pooled to side x side tokens; 0 = not pooled
    interpolate_pos_encoding: bool = False  # forward the vision model with interpolate_pos_encoding=True
    image_tiles: int = 0  # n > 1: the image cut into n x n tiles, each encoded alone
    image_token_id: int = -1
    image_sep_token_id: int = -2
    image_seq_length: int = 49
