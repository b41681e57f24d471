"""How the processes share a training run (as Prismatic's training strategies): one process, DDP or FSDP.

A strategy wraps the training step, says whether a micro-batch's gradients are synchronised, clips the gradient
norm, runs validation and gathers what a checkpoint holds for rank 0 to write. The loop calls the same methods
whichever strategy runs; ``choose`` picks it from ``--fsdp`` and the number of processes.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from . import fsdp
from .distributed import Dist

log = logging.getLogger(__name__)

# ``write(weights, optimizer state)``: weights None are the model's own; the optimizer state is the optimizer
# itself or a state dict gathered from shards
Write = Callable[[dict | None, object], None]


class OneProcess:
    """One process: the training step as it is."""

    def __init__(self, dist: Dist, device: torch.device):
        self.dist, self.device = dist, device
        self.step: nn.Module | None = None  # the training step (a module holding ``vlm``), once wrapped

    @property
    def build_device(self) -> torch.device:
        """Where the model is built."""
        return self.device

    @property
    def validates(self) -> bool:
        """Whether this rank takes part in validation."""
        return self.dist.main

    @property
    def holds_frozen_weights(self) -> bool:
        """Whether frozen LM weights may be held in the compute dtype (sharding wants one dtype per module)."""
        return True

    def wrap(self, step: nn.Module) -> nn.Module:
        """The module to call for a training step. Parameters may be replaced: build the optimizer afterwards."""
        self.step = step
        return step

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward; ``last``: the global batch's last micro-batch."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to ``max_norm``; returns their norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def load_optimizer(self, opt: torch.optim.Optimizer, osd: dict) -> None:
        """Load a saved optimizer state, saved by position (one process, DDP) or by parameter name (FSDP)."""
        fsdp.load_optimizer_state(self.step, opt, osd, sharded=False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Callable[[dict], torch.Tensor] | None]:
        """Around validation: yields the standard loss of a batch (None: the model's own forward)."""
        yield None

    def gather(self, opt: torch.optim.Optimizer | None) -> tuple[dict | None, object]:
        """(weights, optimizer state) to save."""
        return None, opt

    def save(self, write: Write, opt: torch.optim.Optimizer | None = None) -> None:
        """Every rank calls it (gathering may be a collective); rank 0 alone writes."""
        weights, opt_state = self.gather(opt)
        if self.dist.main:
            write(weights, opt_state)


class DDP(OneProcess):
    """Data parallel: every process holds the whole model; gradients are averaged at a step's last micro-batch."""

    def wrap(self, step):
        self.step = step
        self.model = nn.parallel.DistributedDataParallel(step, forward_sync_buffers=False)
        return self.model

    def accumulating(self, last):
        return contextlib.nullcontext() if last else self.model.no_sync()


class FSDP(OneProcess):
    """Fully sharded (``fsdp.shard``): built whole on the CPU, then sharded onto the device; gradients are
    reduce-scattered every micro-batch; every rank validates and gathers checkpoints (collectives)."""

    def __init__(self, dist: Dist, device: torch.device, mode: str):
        super().__init__(dist, device)
        self.mode = mode

    @property
    def build_device(self):
        return torch.device("cpu")

    @property
    def validates(self):
        return True

    @property
    def holds_frozen_weights(self):
        return False

    def wrap(self, step):
        fsdp.shard(step, step.vlm.base_lm, self.mode, self.device)
        self.step = step
        return step

    def clip_grad_norm(self, params, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor())  # a DTensor

    def load_optimizer(self, opt, osd):
        fsdp.load_optimizer_state(self.step, opt, osd, sharded=True)

    @contextlib.contextmanager
    def evaluating(self):
        yield lambda batch: self.step(batch, 0, 0, standard=True)  # through the root, which gathers around it
        self.step.reshard()  # the root keeps its gathered parameters after a forward

    def gather(self, opt):
        weights = fsdp.full_state(self.step)
        return weights, None if opt is None else fsdp.full_optimizer_state(self.step, opt)


def choose(fsdp_mode: str, dist: Dist, device: torch.device) -> OneProcess:
    """The strategy for ``--fsdp fsdp_mode`` with ``dist.world`` processes."""
    if dist.world == 1:
        if fsdp_mode != "none":
            log.warning("--fsdp %s with one process: nothing to shard, training unsharded", fsdp_mode)
        return OneProcess(dist, device)
    return DDP(dist, device) if fsdp_mode == "none" else FSDP(dist, device, fsdp_mode)
