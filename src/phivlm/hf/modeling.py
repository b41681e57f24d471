"""``PhivlmForConditionalGeneration``: phivlm's model as a ``transformers`` model (generate, pipelines).

The same computation as ``phivlm.models.vlm.PhiVLM`` with the vision tower inside: the vision model's hidden
states of ``vision_feature_layer`` -> phivlm's own feature selection (``select_features``: leading CLS/register
tokens dropped, the patch grid optionally pooled) -> phivlm's own projector module -> spliced into the causal
LM's input embeddings at ``image_token_id`` slots; ``image_sep_token_id`` slots get the learned separator. The LM keeps
its own vocabulary and output layer (bias included), so its logits are phivlm's.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from ..models.projector import build_projector
from ..models.vision import select_features, split_tiles
from .configuration import PhivlmConfig


class PhivlmForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = PhivlmConfig
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PhivlmConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        d_lm = config.text_config.hidden_size
        self.projector = build_projector(config.projector, config.vision_config.hidden_size, d_lm,
                                         config.projector_depth,
                                         config.image_seq_length if config.slot_embedding else 0)
        self.separator = nn.Parameter(torch.zeros(d_lm))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, image tokens, d_lm) projected patch features."""
        c = self.config
        kw = {"interpolate_pos_encoding": True} if c.interpolate_pos_encoding else {}
        tiles = split_tiles(pixel_values, c.image_tiles)
        out = self.vision_tower(pixel_values=tiles.to(self.vision_tower.dtype), output_hidden_states=True, **kw)
        feats = select_features(out.hidden_states[c.vision_feature_layer], c.vision_prefix_tokens, c.image_grid_side)
        feats = feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])
        return self.projector(feats.to(self.separator.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        img, sep = input_ids == self.config.image_token_id, input_ids == self.config.image_sep_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(img | sep, 0))
        if pixel_values is not None:
            feats = self.get_image_features(pixel_values)
            if int(img.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(img.sum())} image tokens in the text but {feats.shape[0]} images of "
                                 f"{feats.shape[1]} patches each")
            embeds = embeds.masked_scatter(img.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return torch.where(sep.unsqueeze(-1), self.separator.to(embeds.dtype), embeds)

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache=None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, labels=labels,
                                   logits_to_keep=logits_to_keep, **kwargs)
