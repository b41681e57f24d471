"""Training objectives: standard (one teacher-forced causal pass), autoregressive (scheduled sampling)
and mixed (a fixed share of standard steps, the rest autoregressive).

The autoregressive objective works in two phases:

1. Without gradients (and with dropout off), decide the tokens fed after the prompt. The prompt
   (image, separator and everything before the first labelled token) is encoded once into a KV cache.
   At each labelled position one draw decides, for the whole batch, whether the ground truth is fed
   (probability ``p``, the teacher-forcing rate) or each row's own prediction (greedy argmax or a
   sample); unlabelled positions (later user turns) are always ground truth. Only a position fed a
   prediction needs a step of its own: a run of ground-truth positions goes through the model in one
   chunk. Rows of a right-padded batch are re-packed so their prompts end at a common column (left
   padding) and advance in lockstep.
2. With gradients, one standard teacher-forced pass over the batch with those fed tokens as inputs
   (labels unchanged). The fed tokens are discrete (argmax and sampling have no gradient), so this
   gives exactly the loss and gradients of feeding them token by token with autograd through a KV
   cache, at the cost of one standard step plus a no-grad decode. At ``p = 1`` phase 1 is skipped and
   the loss and gradients are the standard objective's.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache

from ..config import FEEDBACK, TrainConfig
from ..models.vlm import IGNORE, PhiVLM
from ..errors import PhivlmError
from ..registry import Registry

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
@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Dropout off for the block; every submodule's own training flag is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _linear_weights_cast_once(module: nn.Module):
    """Under autocast, give every fp32 ``nn.Linear`` a low-precision copy of its weight and bias for
    the block (no-grad use only: the copies are not the parameters).

    Autocast would cast them again at every decoding step (it never caches casts of frozen weights).
    The copies hold the values autocast would produce, so results do not change. The embedding table
    keeps its fp32 weight (a tied LM head gets its own copy); the originals are put back after."""
    dev = next(module.parameters()).device.type
    if not torch.is_autocast_enabled(dev):
        yield
        return
    dtype = torch.get_autocast_dtype(dev)
    swapped = []
    for m in module.modules():
        if type(m) is not nn.Linear:
            continue
        for name in ("weight", "bias"):
            p = m._parameters.get(name)
            if p is not None and p.dtype == torch.float32:
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


@torch.no_grad()
def _feed_predictions(vlm: PhiVLM, image_features: torch.Tensor, prompt: torch.Tensor,
                      prompt_mask: torch.Tensor, fed: torch.Tensor, cont_labels: torch.Tensor,
                      cuts: list[int], feedback: str, generator: torch.Generator | None) -> None:
    """Phase 1: write each row's own prediction into ``fed`` at the positions ``cuts`` (rows where that
    position is a target), in eval mode on an ordinary KV cache. One decoder call per cut: the first
    encodes the prompt and the ground truth up to the first cut, each later one the previous cut's
    prediction and the ground truth after it."""
    width = prompt.shape[1]
    base = vlm.base_lm
    decoder, head, embed = base.get_decoder(), base.get_output_embeddings(), base.get_input_embeddings()
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(fed.shape)], 1)
    positions = vlm.position_ids(mask)
    cache = DynamicCache(config=base.config)
    with _eval_mode(vlm), _linear_weights_cast_once(vlm):
        for i, c in enumerate(cuts):
            if i == 0:
                x, lo = vlm.embed(torch.cat([prompt, fed[:, :c]], 1), image_features), 0
            else:
                x, lo = embed(fed[:, cuts[i - 1] : c]), width + cuts[i - 1]
            hidden = decoder(inputs_embeds=x, attention_mask=mask[:, : width + c],
                             position_ids=positions[:, lo : width + c], cache=cache, use_cache=True)[0]
            rows = (cont_labels[:, c] != IGNORE).nonzero().squeeze(1)
            logits = head(hidden[rows, -1]).float()
            fed[rows, c] = (logits.argmax(-1) if feedback == "greedy" else
                            torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1))


def autoregressive_loss(vlm: PhiVLM, batch: dict, tf_rate: float, feedback: str = "greedy",
                        generator: torch.Generator | None = None) -> ARResult:
    """Autoregressive loss with scheduled sampling (see the module docstring for the two phases).

    Each target position draws once (for the whole batch): with probability ``tf_rate`` the ground
    truth is fed, else each row's own prediction (``greedy`` argmax or a ``sample`` from the softmax),
    decided without gradients and with dropout off. The loss is then one standard teacher-forced pass
    over the fed tokens. ``generator`` (a CPU generator) makes the draws and samples reproducible."""
    if feedback not in FEEDBACK:
        raise PhivlmError(f"unknown --feedback {feedback!r}; valid: {', '.join(FEEDBACK)}")
    prompt, prompt_mask, first, cont, cont_labels, live = split_prompt(batch)
    n = cont.shape[1]
    fed = cont[:, :-1].clone()  # the tokens fed after the prompt; own predictions go in at the cuts
    cuts = []
    if tf_rate < 1 and n > 1:
        own = torch.rand(n - 1, generator=generator) >= tf_rate
        cuts = (own & (cont_labels[:, :-1] != IGNORE).any(0).cpu()).nonzero().squeeze(1).tolist()
    if not cuts:  # all ground truth: the standard pass
        return ARResult(vlm(**batch), fed, live[:, :-1])
    _feed_predictions(vlm, batch["image_features"], prompt, prompt_mask, fed, cont_labels, cuts, feedback,
                      generator)
    ids = batch["input_ids"].clone()
    rows, cols = live[:, :-1].nonzero(as_tuple=True)
    ids[rows, first[rows] + cols] = fed[rows, cols]
    return ARResult(vlm(**{**batch, "input_ids": ids}), fed, live[:, :-1])


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
    """Scheduled sampling: the model's own predictions fed back at rate 1 - p (decided on a KV cache
    without gradients), then one teacher-forced pass over the fed tokens."""

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
    """The configured objective; a bad objective or schedule name fails here, before any loading (the other
    values: ``RunConfig.validate``)."""
    SCHEDULES.get(cfg.tf_schedule)
    return OBJECTIVES.get(cfg.objective)(cfg)
