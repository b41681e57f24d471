"""Training objectives: standard (one teacher-forced causal pass), autoregressive (scheduled sampling
on a KV cache) and mixed (a fixed share of standard steps, the rest autoregressive).

The autoregressive objective runs the prompt (image, separator and everything before the first
labelled token) once into a KV cache, then goes through the rest of the sequence. At each labelled
position one draw decides, for the whole batch, whether the ground truth is fed (probability ``p``,
the teacher-forcing rate) or each row's own prediction; unlabelled positions (later user turns) are
always ground truth. A prediction needs a step of its own; a run of ground-truth positions goes
through the model in one pass over the cache, with the same result as feeding it token by token.
Rows of a right-padded batch are re-packed so their prompts end at a common column (left padding)
and advance in lockstep. At ``p = 1`` the loss and gradients equal the standard objective's.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..config import TrainConfig
from ..models.vlm import IGNORE, PhiVLM
from ..registry import PhivlmError, Registry

FEEDBACK = ("greedy", "sample")

# -- teacher-forcing schedules -----------------------------------------------------------------
# Each maps (p0, p_min, step, decay_steps) to the teacher-forcing rate at ``step`` (0-based).
SCHEDULES: Registry[Callable[[float, float, int, int], float]] = Registry("teacher-forcing schedule")


@SCHEDULES.register("constant")
def constant(p0: float, p_min: float, step: int, decay_steps: int) -> float:
    return p0


@SCHEDULES.register("linear")
def linear(p0: float, p_min: float, step: int, decay_steps: int) -> float:
    """Straight line from ``p0`` at step 0 to ``p_min`` at ``decay_steps``, then flat."""
    return p0 + (p_min - p0) * min(1.0, step / max(decay_steps, 1))


@SCHEDULES.register("exponential")
def exponential(p0: float, p_min: float, step: int, decay_steps: int) -> float:
    """The gap to ``p_min`` shrinks geometrically, by 100x at ``decay_steps``: p_min + (p0 - p_min) * 0.01^(s/D)."""
    return p_min + (p0 - p_min) * 0.01 ** (step / max(decay_steps, 1))


# -- the autoregressive loss -------------------------------------------------------------------
class _ReplayLayer(DynamicLayer):
    """One layer's KV cache with a fixed past: ``update`` returns past + new without changing the past,
    so a gradient-checkpointing replay of the layer sees exactly what the first run saw."""

    def __init__(self, keys: tuple = (), values: tuple = (), merge: bool = True):
        super().__init__()
        self.past_keys, self.past_values, self.merge = keys, values, merge
        self.is_initialized = bool(keys)
        self.new: tuple = ()

    def get_seq_length(self) -> int:
        return sum(k.shape[-2] for k in self.past_keys)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = (*self.past_keys, key_states), (*self.past_values, value_states)
        full_k = torch.cat(keys, -2) if len(keys) > 1 else key_states
        full_v = torch.cat(values, -2) if len(values) > 1 else value_states
        # merged: one tensor per layer; else per-step chunks (a checkpointing replay recomputes the cat)
        self.new = ((full_k,), (full_v,)) if self.merge else (keys, values)
        return full_k, full_v

    def advanced(self) -> "_ReplayLayer":
        return _ReplayLayer(*self.new, merge=self.merge)


class _ReplayCache(Cache):
    """A KV cache safe for training: each step gets a new cache object whose past never changes.

    ``merge`` (no checkpointing) stores one concatenated tensor per layer; without it (checkpointing)
    the past stays a tuple of per-step chunks, so memory stays linear in the sequence length.
    """

    def __init__(self, layers: list[_ReplayLayer] | None = None, merge: bool = True):
        if layers is None:
            super().__init__(layer_class_to_replicate=lambda: _ReplayLayer(merge=merge))
        else:
            super().__init__(layers=layers)

    def advanced(self) -> "_ReplayCache":
        return _ReplayCache([layer.advanced() for layer in self.layers])


@contextlib.contextmanager
def _checkpointing_with_cache(lm: nn.Module):
    """Let gradient-checkpointed decoder layers keep the cache (transformers drops it otherwise; our
    cache is replay-safe). Yields whether checkpointing is active."""
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    active = lm.training and torch.is_grad_enabled() and any(m.gradient_checkpointing for m in layers)
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield active
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


@contextlib.contextmanager
def _frozen_weights_cast_once(lm: nn.Module):
    """Under autocast, give frozen fp32 ``nn.Linear`` weights a low-precision copy for the whole loop.

    Autocast caches casts of trainable weights only; frozen ones would be re-cast (and a new copy kept
    for backward) at every step. The copy holds the values autocast would produce, so results do not
    change. The embedding table keeps its fp32 weight (a tied LM head gets its own copy)."""
    dev = next(lm.parameters()).device.type
    if not torch.is_autocast_enabled(dev):
        yield
        return
    dtype = torch.get_autocast_dtype(dev)
    swapped = []
    for m in lm.modules():
        if type(m) is not nn.Linear:
            continue
        for name in ("weight", "bias"):
            p = m._parameters.get(name)
            if p is not None and p.dtype == torch.float32 and not p.requires_grad:
                swapped.append((m, name, p))
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


class ARResult(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over target tokens
    fed: torch.Tensor  # (B, n-1) the tokens fed after the prompt, from the first target on
    fed_mask: torch.Tensor  # (B, n-1) True where that token belongs to the sample (not finished/padding)


def split_prompt(batch: dict):
    """Right-padded batch -> (prompt ids left-padded to a common width, prompt mask, first-target
    column per row, continuation ids, labels and validity (B, n) from the first to the last target)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, t = ids.shape
    cols = torch.arange(t, device=ids.device)
    target = labels != IGNORE
    has = target.any(1)
    first = torch.where(has, target.int().argmax(1), mask.sum(1))
    last = torch.where(has, t - 1 - target.flip(1).int().argmax(1), first - 1)
    width = int(first.max())
    src = cols[:width] - (width - first)[:, None]
    in_prompt = src >= 0
    prompt = torch.where(in_prompt, ids.gather(1, src.clamp(min=0)), 0)
    n = int((last - first + 1).max())
    src = first[:, None] + cols[:n]
    live = src <= last[:, None]
    src = src.clamp(max=t - 1)
    cont = torch.where(live, ids.gather(1, src), 0)
    if bool((cont < 0).any()):
        raise ValueError("image/separator slots after the first labelled token")
    cont_labels = torch.where(live, labels.gather(1, src), IGNORE)
    return prompt, in_prompt.long(), first, cont, cont_labels, live


def autoregressive_loss(vlm: PhiVLM, batch: dict, tf_rate: float, feedback: str = "greedy",
                        generator: torch.Generator | None = None) -> ARResult:
    """Autoregressive loss on a KV cache with scheduled sampling.

    Each fed target position draws once (for the whole batch): with probability ``tf_rate`` the ground
    truth, else each row's own prediction (``greedy`` argmax or a ``sample`` from the softmax). Only
    positions fed a prediction need a step of their own: a run of teacher-forced positions goes
    through the model in one pass over the cache, which gives the same result as feeding it token by
    token (at ``tf_rate = 1``: one pass; at 0: one step per token). ``generator`` (a CPU generator)
    makes the draws and samples reproducible."""
    if feedback not in FEEDBACK:
        raise PhivlmError(f"unknown --feedback {feedback!r}; valid: {', '.join(FEEDBACK)}")
    prompt, prompt_mask, first, cont, cont_labels, live = split_prompt(batch)
    b, n = cont.shape
    width = prompt.shape[1]
    base = vlm.base_lm
    decoder, head, embed = base.get_decoder(), base.get_output_embeddings(), base.get_input_embeddings()
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, n - 1)], 1)
    positions = vlm.position_ids(mask)
    fed = cont[:, :-1].clone()  # the tokens fed after the prompt; own predictions go in at the cuts
    own = torch.rand(n - 1, generator=generator) >= tf_rate
    cuts = (own & (cont_labels[:, :-1] != IGNORE).any(0).cpu()).nonzero().squeeze(1).tolist()
    states = []
    with _checkpointing_with_cache(base) as checkpointing, _frozen_weights_cast_once(base):
        cache = _ReplayCache(merge=not checkpointing)
        # after the prompt, queries are few: plain attention is cheap there, and the fused kernels'
        # backward is far slower on CPU. A checkpointing replay runs outside this context, so it must
        # then use the kernel the forward used.
        attention = contextlib.nullcontext if checkpointing else partial(sdpa_kernel, SDPBackend.MATH)
        for i, (s, e) in enumerate(zip([0] + cuts, cuts + [n - 1])):
            if i == 0:  # the prompt and the teacher-forced run after it
                x, lo = vlm.embed(torch.cat([prompt, fed[:, :e]], 1), batch["image_features"]), 0
            else:  # position s gets each row's own prediction (where it is a target)
                rows = (cont_labels[:, s] != IGNORE).nonzero().squeeze(1)
                with torch.no_grad():
                    logits = head(states[-1][rows, -1]).float()
                    fed[rows, s] = (logits.argmax(-1) if feedback == "greedy" else
                                    torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1))
                x, lo = embed(fed[:, s:e].clone()), width + s  # a copy: fed changes later
                cache = cache.advanced()
            with contextlib.nullcontext() if i == 0 else attention():
                # use_cache=False: the cache is passed explicitly (use_cache only asks the model to make one)
                hidden = decoder(inputs_embeds=x, attention_mask=mask[:, : width + e],
                                 position_ids=positions[:, lo : width + e], cache=cache, use_cache=False)[0]
            states.append(hidden[:, width - 1 :] if i == 0 else hidden)
        predictors = torch.cat(states, 1)  # (B, n, d): the state that predicts each continuation position
        targets = cont_labels != IGNORE
        logits = head(predictors[targets]).float()  # logits only where there is a target
    return ARResult(F.cross_entropy(logits, cont_labels[targets]), fed, live[:, :-1])


# -- objectives ----------------------------------------------------------------------------------
class Objective:
    """The loss of one training step: ``objective(vlm, batch, step, total_steps)``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def tf_rate(self, step: int, total_steps: int) -> float | None:
        """Teacher-forcing rate of autoregressive steps at ``step`` (None: no autoregressive steps)."""
        c = self.cfg
        return SCHEDULES.get(c.tf_schedule)(c.tf_start, c.tf_end, step, c.tf_decay_steps or total_steps)

    def __call__(self, vlm: PhiVLM, batch: dict, step: int, total_steps: int) -> torch.Tensor:
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("standard")
class Standard(Objective):
    """One causal pass over the whole sequence, shifted labels, always teacher-forced."""

    def tf_rate(self, step, total_steps):
        return None

    def __call__(self, vlm, batch, step, total_steps):
        return vlm(**batch)


@OBJECTIVES.register("autoregressive")
class Autoregressive(Objective):
    """Token by token on a KV cache, feeding back the model's predictions at rate 1 - p (scheduled sampling)."""

    def __call__(self, vlm, batch, step, total_steps):
        return autoregressive_loss(vlm, batch, self.tf_rate(step, total_steps), self.cfg.feedback).loss


@OBJECTIVES.register("mixed")
class Mixed(Autoregressive):
    """Standard on a fixed, evenly spread share of steps (``mixed_standard_fraction``), else autoregressive."""

    def uses_standard(self, step: int) -> bool:
        f = self.cfg.mixed_standard_fraction
        return math.floor((step + 1) * f) > math.floor(step * f)

    def __call__(self, vlm, batch, step, total_steps):
        if self.uses_standard(step):
            return vlm(**batch)
        return super().__call__(vlm, batch, step, total_steps)


def build_objective(cfg: TrainConfig) -> Objective:
    """The configured objective; bad names or rates fail here, before any loading."""
    SCHEDULES.get(cfg.tf_schedule)
    if cfg.feedback not in FEEDBACK:
        raise PhivlmError(f"unknown --feedback {cfg.feedback!r}; valid: {', '.join(FEEDBACK)}")
    for name in ("tf_start", "tf_end", "mixed_standard_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise PhivlmError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.tf_decay_steps < 0:
        raise PhivlmError(f"--tf-decay-steps must be >= 0, got {cfg.tf_decay_steps}")
    return OBJECTIVES.get(cfg.objective)(cfg)
