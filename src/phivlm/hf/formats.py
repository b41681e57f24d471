"""Export formats (a registry): phivlm's parts -> a ``transformers`` model, and back.

``llava``: ``LlavaForConditionalGeneration``, the layout vLLM and SGLang serve. Its projector is always
``linear_1 -> act -> linear_2``: ``mlp2x_gelu`` maps 1:1 (act ``gelu`` is the same exact-erf GELU); ``linear``
becomes ``linear_1`` = the projector, act ``linear`` (identity) and ``linear_2`` = identity matrix with zero
bias, which is exact (x*1 and x+0 are exact in floating point). The separator is the embedding row of the
``<image_sep>`` token; the vocabulary grows to hold ``<image>`` and ``<image_sep>`` (and so does the output
layer, tied or not: those logits are suppressed by the exported generation config; where a padded vocabulary
already has room, the new tokens take unused padding rows). An output-layer bias (Phi-2) cannot be held.
vLLM's activation registry (in the sources seen) has no identity (``linear``): vLLM would need it added to
serve a ``linear`` Llava export; ``mlp2x_gelu`` uses its ``gelu``.
Llava's image features are ``hidden_states[vision_feature_layer]`` with 1 leading token dropped
(``vision_feature_select_strategy`` ``default``: CLIP's or DINOv2's CLS) or none (``full``: SigLIP), no pooling,
and the vision model run without ``interpolate_pos_encoding`` (DINOv2 interpolates on its own; CLIP and SigLIP
then only take their configured image size). Anything else (register tokens, a pooled token grid, CLIP/SigLIP
at another image size, an image cut into tiles) needs the phivlm format. ``transformers`` builds a Llava around
any ``AutoModel`` vision config; vLLM's Llava (in the sources seen) only around CLIP, SigLIP or Pixtral, so it
cannot serve a DINOv2 one.
``phivlm``: ``PhivlmForConditionalGeneration`` (``phivlm.hf``): any projector and tower setting (its config
records the prefix tokens to drop, the pooled grid, ``interpolate_pos_encoding`` and the tiles), the LM unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry


# Llava's vision_feature_select_strategy for the number of leading tokens phivlm drops
LLAVA_STRATEGY = {1: "default", 0: "full"}


@dataclass
class Parts:
    """A phivlm model taken apart: the (merged) causal LM, the full vision model (all layers), projector,
    separator, and how phivlm reads the vision model's hidden states."""

    lm: nn.Module
    vision: nn.Module
    projector: nn.Module
    separator: torch.Tensor
    projector_name: str
    projector_depth: int
    feature_layer: int
    prefix: int  # leading non-patch tokens (CLS, registers) dropped from the hidden states
    image_size: int  # pixels of the whole image
    grid: int  # side of the native patch grid of what the vision model sees at once (the image, or one tile)
    pooled_side: int  # side of the pooled token grid (0 = not pooled)
    interpolate: bool  # phivlm runs the vision model with interpolate_pos_encoding=True
    num_image_tokens: int
    image_token_id: int
    image_sep_token_id: int
    tiles: int = 1  # the image cut into tiles x tiles tiles, each encoded alone
    markers_after: bool = False  # each tile's text marker after its image tokens (--tile-markers after)

    @property
    def slot_embedding(self) -> bool:
        """Whether the projector ends with a learned vector per image-token slot."""
        from ..models.projector import SlotEmbedding

        return isinstance(self.projector, SlotEmbedding)

    @property
    def lm_vocab_size(self) -> int:
        return self.lm.get_input_embeddings().num_embeddings

    @property
    def pooled(self) -> bool:
        """Whether features are pooled to a grid other than the native one."""
        return bool(self.pooled_side) and self.pooled_side != self.grid


class ExportFormat:
    name = ""

    def unsupported(self, parts: Parts) -> str | None:
        """Why this format cannot hold ``parts`` exactly, or None."""
        return None

    def build(self, parts: Parts) -> nn.Module:
        raise NotImplementedError

    def unpack(self, model: nn.Module, meta: dict) -> tuple[nn.Module, nn.Module, dict, torch.Tensor]:
        """An exported model (+ its export marker) -> (causal LM with its original vocabulary, vision model,
        projector state, separator)."""
        raise NotImplementedError

    def selection(self, model: nn.Module) -> tuple[int, int, bool, int]:
        """How an exported model reads its vision model's hidden states: (leading tokens dropped, pooled grid
        side or 0, interpolate_pos_encoding, tiles per side or 0)."""
        raise NotImplementedError


FORMATS: Registry[type[ExportFormat]] = Registry("export format")


def _embedding_key(module: nn.Module, weight: torch.Tensor) -> str:
    return next(k for k, v in module.named_parameters(remove_duplicate=False) if v is weight)


def _output_bias(lm: nn.Module) -> torch.Tensor | None:
    return getattr(lm.get_output_embeddings(), "bias", None)


@FORMATS.register("llava")
class Llava(ExportFormat):
    name = "llava"
    PROJECTOR_ACT = {"linear": "linear", "mlp2x_gelu": "gelu"}

    def unsupported(self, parts):
        if parts.projector_name not in self.PROJECTOR_ACT:
            return (f"Llava's projector is Linear-act-Linear; the {parts.projector_name!r} projector needs "
                    "--format phivlm")
        if parts.slot_embedding:
            return "the projected image tokens get a learned vector per slot (--slot-embedding), which Llava has not"
        bias = _output_bias(parts.lm)
        if bias is not None and bool(bias.detach().abs().gt(0).any()):
            return "the LM's output layer has a bias, which LlavaForConditionalGeneration does not hold"
        kind = parts.vision.config.model_type
        if parts.tiles > 1:
            return (f"the image is cut into {parts.tiles}x{parts.tiles} tiles encoded one by one, with text markers "
                    "between them; Llava encodes the whole image")
        if parts.prefix not in LLAVA_STRATEGY:
            return (f"the {kind} features drop {parts.prefix} leading tokens (CLS + {parts.prefix - 1} register "
                    "tokens); Llava's vision_feature_select_strategy drops 1 ('default') or none ('full')")
        if parts.pooled:
            return (f"the {parts.grid}x{parts.grid} patch grid is pooled to {parts.pooled_side}x{parts.pooled_side} "
                    "image tokens; Llava has no pooling")
        if parts.interpolate:
            return (f"the {kind} tower runs at {parts.image_size} px with interpolated position embeddings (its "
                    f"own size is {parts.vision.config.image_size} px); Llava does not pass interpolate_pos_encoding")
        return None

    def build(self, parts):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        lm, v0 = parts.lm, parts.lm_vocab_size
        vocab = max(v0, parts.image_token_id + 1, parts.image_sep_token_id + 1)
        text_config = copy.deepcopy(lm.config)
        text_config.vocab_size = vocab
        config = LlavaConfig(vision_config=copy.deepcopy(parts.vision.config), text_config=text_config,
                             image_token_index=parts.image_token_id, image_seq_length=parts.num_image_tokens,
                             projector_hidden_act=self.PROJECTOR_ACT[parts.projector_name],
                             vision_feature_layer=parts.feature_layer,
                             vision_feature_select_strategy=LLAVA_STRATEGY[parts.prefix],
                             multimodal_projector_bias=True)
        model = LlavaForConditionalGeneration(config).float().eval()

        def grow(w: torch.Tensor, separator: torch.Tensor | None) -> torch.Tensor:
            """Rows for the new tokens: zeros, or the separator in the ``<image_sep>`` row."""
            out = torch.cat([w.detach().float(), w.new_zeros(vocab - v0, w.shape[1]).float()])
            if separator is not None:
                out[parts.image_sep_token_id] = separator.detach().float()
            return out

        base = lm.base_model
        state = base.state_dict()
        emb_key = _embedding_key(base, lm.get_input_embeddings().weight)
        state[emb_key] = grow(state[emb_key], parts.separator)
        with torch.no_grad():
            model.model.language_model.load_state_dict(state)
            model.model.vision_tower.load_state_dict(parts.vision.state_dict())
            proj = model.model.multi_modal_projector
            if parts.projector_name == "linear":
                proj.linear_1.load_state_dict(parts.projector.state_dict())
                proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
                proj.linear_2.bias.zero_()
            else:
                proj.linear_1.load_state_dict(parts.projector[0].state_dict())
                proj.linear_2.load_state_dict(parts.projector[2].state_dict())
            if model.lm_head.weight is not model.get_input_embeddings().weight:  # untied: its own head
                model.lm_head.weight.copy_(grow(lm.get_output_embeddings().weight, None))
        return model

    def unpack(self, model, meta):
        from transformers import AutoModelForCausalLM

        v0 = meta["lm_vocab_size"]
        text_config = copy.deepcopy(model.config.text_config)
        text_config.vocab_size = v0
        lm = AutoModelForCausalLM.from_config(text_config).float().eval()
        base = model.model.language_model
        state = base.state_dict()
        emb_key = _embedding_key(base, base.get_input_embeddings().weight)
        separator = state[emb_key][meta["image_sep_token_id"]].clone()
        state[emb_key] = state[emb_key][:v0]
        proj = model.model.multi_modal_projector
        if model.config.projector_hidden_act == "linear":  # linear_2 is the identity
            proj_state = dict(proj.linear_1.state_dict())
        else:
            proj_state = {**{f"0.{k}": v for k, v in proj.linear_1.state_dict().items()},
                          **{f"2.{k}": v for k, v in proj.linear_2.state_dict().items()}}
        with torch.no_grad():
            lm.base_model.load_state_dict(state)
            if lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
                lm.get_output_embeddings().weight.copy_(model.lm_head.weight[:v0])
            if (bias := _output_bias(lm)) is not None:
                bias.zero_()  # the export required it to be zero
        return lm, model.model.vision_tower, proj_state, separator

    def selection(self, model):
        strategy = {v: k for k, v in LLAVA_STRATEGY.items()}
        return strategy[model.config.vision_feature_select_strategy], 0, False, 0


@FORMATS.register("phivlm")
class Phivlm(ExportFormat):
    name = "phivlm"

    def build(self, parts):
        from .configuration import PhivlmConfig
        from .modeling import PhivlmForConditionalGeneration

        config = PhivlmConfig(vision_config=copy.deepcopy(parts.vision.config),
                              text_config=copy.deepcopy(parts.lm.config), projector=parts.projector_name,
                              projector_depth=parts.projector_depth, slot_embedding=parts.slot_embedding,
                              vision_feature_layer=parts.feature_layer,
                              vision_prefix_tokens=parts.prefix,
                              image_grid_side=parts.pooled_side if parts.pooled else 0,
                              interpolate_pos_encoding=parts.interpolate,
                              image_tiles=parts.tiles if parts.tiles > 1 else 0,
                              image_token_id=parts.image_token_id, image_sep_token_id=parts.image_sep_token_id,
                              image_seq_length=parts.num_image_tokens)
        model = PhivlmForConditionalGeneration(config).float().eval()
        with torch.no_grad():
            model.vision_tower.load_state_dict(parts.vision.state_dict())
            model.projector.load_state_dict(parts.projector.state_dict())
            model.separator.copy_(parts.separator)
            model.language_model.load_state_dict(parts.lm.state_dict())
        return model

    def unpack(self, model, meta):
        return model.language_model, model.vision_tower, model.projector.state_dict(), model.separator.detach()

    def selection(self, model):
        c = model.config
        return c.vision_prefix_tokens, c.image_grid_side, c.interpolate_pos_encoding, c.image_tiles
