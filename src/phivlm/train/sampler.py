"""Deterministic, resumable, rank-sharded batching.

The data order is a pure function of (seed, epoch): a seeded permutation, optionally grouped by
length (sort within windows of global batches, then shuffle the batches) to cut padding. Each
optimizer step consumes one *global batch* of ``batch_size * world * accum`` samples, split into
``world * accum`` micro-batches; rank ``r`` takes micro-batches ``r, r + world, ...``. So a step's
samples are the same whatever the number of processes, and resuming at step ``s`` means starting at
global batch ``s`` — no sampler state to save.
"""
from __future__ import annotations

import torch

from ..errors import PhivlmError


class StepBatches:
    def __init__(self, lengths: list[int], batch_size: int, seed: int, world: int = 1, rank: int = 0,
                 accum: int = 1, group_by_length: bool = False, window: int = 64):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.world, self.rank, self.accum = world, rank, accum
        self.group_by_length, self.window = group_by_length, window
        self.global_size = batch_size * world * accum
        if len(lengths) < self.global_size:
            raise PhivlmError(f"{len(lengths)} samples < one global batch of {self.global_size} "
                              "(--batch-size x processes x --grad-accum): lower --batch-size")
        self.steps_per_epoch = len(lengths) // self.global_size  # the incomplete tail batch is dropped
        self._cached: tuple[int, list[list[int]]] | None = None

    def global_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._order(epoch))
        return self._cached[1]

    def _order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        n = self.steps_per_epoch * self.global_size
        order = order[:n]
        if self.group_by_length:
            span = self.window * self.global_size
            order = [i for s in range(0, n, span)
                     for i in sorted(order[s:s + span], key=lambda i: self.lengths[i])]
        batches = [order[s:s + self.global_size] for s in range(0, n, self.global_size)]
        if self.group_by_length:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[p] for p in perm]
        return batches

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``accum`` micro-batches for optimizer step ``step`` (0-based, across epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        micro = self._split(self.global_batches(epoch)[index])
        return micro[self.rank::self.world]

    def _split(self, batch: list[int]) -> list[list[int]]:
        if self.group_by_length:  # similar lengths share a micro-batch
            batch = sorted(batch, key=lambda i: self.lengths[i])
        return [batch[s:s + self.batch_size] for s in range(0, len(batch), self.batch_size)]

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded positions in this epoch's micro-batches (all ranks)."""
        pad = total = 0
        for batch in self.global_batches(epoch):
            for micro in self._split(batch):
                lens = [self.lengths[i] for i in micro]
                pad += max(lens) * len(lens) - sum(lens)
                total += max(lens) * len(lens)
        return pad / max(total, 1)
