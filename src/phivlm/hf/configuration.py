"""``PhivlmConfig``: a CLIP vision config, a causal-LM config and phivlm's projector settings."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class PhivlmConfig(PreTrainedConfig):
    """Model type ``phivlm``. Token ids ``image_token_id`` / ``image_sep_token_id`` may lie outside the LM
    vocabulary: they are never looked up, their slots get the projected patches and the separator."""

    model_type = "phivlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector: str = "residual"  # a name in phivlm.models.projector.PROJECTORS
    projector_depth: int = 2
    vision_feature_layer: int = -2  # hidden-state index; the CLS token is dropped
    image_token_id: int = -1
    image_sep_token_id: int = -2
    image_seq_length: int = 49
