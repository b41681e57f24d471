"""The reference a user would write with ``transformers``: ``LlavaForConditionalGeneration`` built from the
same CLIP vision weights, the same LM weights and the same projector as the phivlm model it is timed against.

The vocabulary grows by two rows, ``<image>`` (zeros; its embeddings are replaced by image features) and
``<image_sep>`` (phivlm's separator vector), so the reference computes the same function as phivlm's
``mlp2x_gelu`` model (its feature standardisation, where it has one, folded into the first Linear): the
same loss on the same batch (checked by the benchmark). The vision tower runs
every step (all its layers: Llava asks for the hidden states and picks layer ``vision_feature_layer``),
logits are computed at every position, and the loss is Llava's own (``labels=``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.vlm import IMAGE_ID, SEP_ID, PhiVLM
from ..config import TuningConfig


class Reference:
    """A ``LlavaForConditionalGeneration`` (``model``) and the token ids phivlm's sentinels map to."""

    def __init__(self, clip: nn.Module, vlm: PhiVLM, feature_layer: int):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        lm = vlm.base_lm
        v0 = lm.get_input_embeddings().num_embeddings
        self.image_id, self.sep_id = v0, v0 + 1
        text_config = copy.deepcopy(lm.config)
        text_config.vocab_size = v0 + 2
        config = LlavaConfig(vision_config=copy.deepcopy(clip.config), text_config=text_config,
                             image_token_index=self.image_id, image_seq_length=vlm.num_image_tokens,
                             projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                             vision_feature_select_strategy="default", multimodal_projector_bias=True)
        model = LlavaForConditionalGeneration(config).float()
        state = dict(lm.base_model.state_dict())
        emb = lm.get_input_embeddings().weight.detach()
        key = next(k for k, v in lm.base_model.named_parameters(remove_duplicate=False)
                   if v is lm.get_input_embeddings().weight)
        grown = torch.cat([emb.float(), emb.new_zeros(2, emb.shape[1]).float()])
        grown[self.sep_id] = vlm.separator.detach().float()
        state[key] = grown
        proj = vlm.projector
        if not (isinstance(proj, nn.Sequential) and len(proj) == 3):
            raise ValueError("the Llava reference needs phivlm's mlp2x_gelu projector (Linear-GELU-Linear)")
        # phivlm's feature standardisation, folded in (exact up to rounding)
        weight, bias = vlm.feature_norm.fold(proj[0].weight, proj[0].bias)
        first = {"weight": weight, "bias": bias}
        with torch.no_grad():
            model.model.language_model.load_state_dict(state)
            model.model.vision_tower.load_state_dict(clip.state_dict())
            model.model.multi_modal_projector.linear_1.load_state_dict(first)
            model.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
            if model.lm_head.weight is not model.get_input_embeddings().weight:  # untied head: its own rows
                head = lm.get_output_embeddings().weight.detach().float()
                model.lm_head.weight.copy_(torch.cat([head, head.new_zeros(2, head.shape[1])]))
        self.model = model

    def ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """phivlm ids (sentinels for the image slots and separator) -> this model's token ids."""
        out = input_ids.clone()
        out[input_ids == IMAGE_ID] = self.image_id
        out[input_ids == SEP_ID] = self.sep_id
        return out

    def freeze_for_stage1(self) -> None:
        """Vision tower and LM frozen, projector trained."""
        self.model.requires_grad_(False)
        self.model.model.multi_modal_projector.requires_grad_(True)

    def apply_lora(self, tuning: TuningConfig, targets: list[str]) -> None:
        """PEFT LoRA on the LM's ``targets`` (not the vision tower's layers of the same names), projector trained."""
        from peft import LoraConfig, get_peft_model

        self.model.requires_grad_(False)
        pattern = r".*language_model\..*\.(" + "|".join(targets) + ")"
        cfg = LoraConfig(r=tuning.lora_rank, lora_alpha=tuning.lora_alpha, lora_dropout=tuning.lora_dropout,
                         target_modules=pattern, task_type="CAUSAL_LM")
        self.model = get_peft_model(self.model, cfg)
        self.model.get_base_model().model.multi_modal_projector.requires_grad_(True)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
