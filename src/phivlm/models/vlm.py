"""The multimodal model: projected image features + learned separator spliced into the LM input.

Token ids use two negative sentinels: ``IMAGE_ID`` marks the slots of the image embeddings (one
per patch) and ``SEP_ID`` the image-separator embedding. They are replaced with one
``masked_scatter`` / ``where`` over the padded batch: no per-sample Python loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import decoder as fast
from . import unpadded
from .norms import fuse_rms_norms
from .projector import build_projector

IMAGE_ID = -1
SEP_ID = -2
IGNORE = -100


class FeatureNorm(nn.Module):
    """Per-dimension standardisation of the frozen tower's features, with statistics of the training
    images (set once by ``fit`` before stage 1, then saved with the projector).

    Features of a tower without pretrained weights (the built-in ``clip-vit-b32``) are ~96% one shared
    vector (norm ~37 of ~38): the image-specific part is small next to it, and the projector learns
    far faster from standardised inputs. For pretrained CLIP it is a harmless affine reparametrisation."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> None:
        flat = feats.reshape(-1, feats.shape[-1]).float()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    @torch.no_grad()
    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the Linear that gives, on raw features, what (weight, bias) gives on standardised ones."""
        weight = weight / self.std.to(weight)
        return weight, bias - weight @ self.mean.to(weight)


class PhiVLM(nn.Module):
    def __init__(self, lm: nn.Module, d_vision: int, num_image_tokens: int, projector: str = "residual",
                 projector_depth: int = 2, slot_embedding: bool = False):
        super().__init__()
        self.lm = lm
        d_lm = lm.get_input_embeddings().embedding_dim
        self.num_image_tokens = num_image_tokens
        self.feature_norm = FeatureNorm(d_vision)
        self.projector = build_projector(projector, d_vision, d_lm, projector_depth,
                                         num_image_tokens if slot_embedding else 0)
        std = lm.get_input_embeddings().weight.detach().float().std().item()
        self.separator = nn.Parameter(torch.randn(d_lm) * std)
        self.decoder: fast.Decoder | None = None  # set by prepare_decoding

    # -- parts -------------------------------------------------------------------------------
    @property
    def base_lm(self) -> nn.Module:
        """The underlying ``*ForCausalLM`` (inside a PEFT wrapper if there is one)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Feature statistics, projector and separator weights (always saved with a checkpoint)."""
        sd = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        sd.update({f"feature_norm.{k}": v for k, v in self.feature_norm.state_dict().items()})
        sd["separator"] = self.separator.data
        return sd

    @torch.no_grad()
    def fold_feature_norm(self) -> None:
        """Fold the feature standardisation into the projector's first Linear (exact up to rounding),
        leaving an identity ``feature_norm``: exports then need no extra layer."""
        first = next(m for m in self.projector.modules() if isinstance(m, nn.Linear))
        weight, bias = self.feature_norm.fold(first.weight, first.bias)
        first.weight.copy_(weight)
        first.bias.copy_(bias)
        self.feature_norm.mean.zero_()
        self.feature_norm.std.fill_(1.0)

    # -- inputs --------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """(B, T) ids with sentinels + (B, P, d_vision) features -> (B, T, d_lm) input embeddings."""
        emb = self.base_lm.get_input_embeddings()
        text = emb(input_ids.clamp(min=0))
        img_mask = input_ids == IMAGE_ID
        n_slots, n_feats = int(img_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"batch has {n_slots} image slots but {n_feats} image feature vectors")
        img = self.projector(self.feature_norm(image_features).to(self.projector_dtype)).to(text.dtype)
        embeds = text.masked_scatter(img_mask.unsqueeze(-1), img.reshape(-1, img.shape[-1]))
        return torch.where((input_ids == SEP_ID).unsqueeze(-1), self.separator.to(text.dtype), embeds)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that skip left padding (right padding gives 0..T-1)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # -- training ------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, image_features, labels) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens; logits only where there is a label."""
        embeds = self.embed(input_ids, image_features)
        base = self.base_lm
        if unpadded.active(base):
            hidden = unpadded.decoder_hidden(base.get_decoder(), embeds, attention_mask,
                                             self.position_ids(attention_mask))
        else:
            hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=self.position_ids(attention_mask), use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def hold_weights_in(self, dtype: torch.dtype) -> None:
        """Under autocast: keep the LM's frozen Linear weights in the compute dtype once. Autocast caches casts
        only of weights that require grad, so frozen weights (inference, a frozen LM in stage 1, LoRA's base) are
        otherwise cast again at every forward. A frozen head tied to the embeddings gets its own copy, so the
        embeddings and the residual stream stay fp32: the same numbers autocast computes. Weights that train
        (adapters, full tuning) stay fp32 master copies; quantized LMs are left alone."""
        base = self.base_lm
        if getattr(base, "hf_quantizer", None) is not None:
            return
        head, emb = base.get_output_embeddings(), base.get_input_embeddings()
        if head is not None and head.weight is emb.weight and not head.weight.requires_grad:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for m in base.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad:
                m.weight.data = m.weight.data.to(dtype)

    @torch.no_grad()
    def prepare_training(self, dtype: torch.dtype | None) -> None:
        """For training: hold the frozen LM weights in the compute dtype (None: leave them, e.g. fp32 or sharded),
        run its RMSNorms fused (``models.norms``) and, where the LM runs eager attention, compute its position-wise
        work on real tokens only (``models.unpadded``). Same loss and gradients."""
        if dtype is not None:
            self.hold_weights_in(dtype)
        fuse_rms_norms(self.base_lm)
        if unpadded.supports(self.base_lm):
            unpadded.use(self.base_lm)

    @torch.no_grad()
    def prepare_decoding(self, dtype: torch.dtype | None) -> None:
        """For inference: hold the LM's weights in the compute dtype (None: fp32, as they are) and, for a
        Llama-architecture LM, decode with ``models.decoder`` (same tokens, a fraction of the per-step ops)."""
        if dtype is not None:
            self.hold_weights_in(dtype)
        base = self.base_lm
        self.decoder = fast.Decoder(base, dtype or torch.float32) if fast.supports(base) else None

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of each row's last position only (one (B, d) x (d, V) product)."""
        if self.decoder is not None:
            return self.decoder.logits(hidden[:, -1])
        return self.base_lm.get_output_embeddings()(hidden[:, -1]).float()

    def prefill(self, input_ids, attention_mask, image_features):
        """Run the prompt once; returns (last-position logits, KV cache)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        hidden = self.base_lm.get_decoder()(inputs_embeds=self.embed(input_ids, image_features),
                                            attention_mask=attention_mask,
                                            position_ids=self.position_ids(attention_mask), cache=cache,
                                            use_cache=True)[0]
        return self._last_logits(hidden), (cache if self.decoder is None else self.decoder.adopt(cache))

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, cache):
        """Feed one token per row (B,) with the KV cache; returns (logits, cache)."""
        pos = self.position_ids(attention_mask)[:, -1:]
        if isinstance(cache, fast.KVCache):
            hidden = self.decoder.step(tokens, pos, attention_mask, cache).unsqueeze(1)
            return self._last_logits(hidden), cache
        emb = self.base_lm.get_input_embeddings()(tokens.unsqueeze(1))
        hidden = self.base_lm.get_decoder()(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos,
                                            cache=cache, use_cache=True)[0]
        return self._last_logits(hidden), cache
