"""Who reads what: the global positions of one reader (rank r, DataLoader worker w) and where their samples lie.

With micro-batch m, W ranks, K readers per rank (DataLoader workers; 1 in the main process) and the loader started
at cursor c0 (global samples consumed before it), global chunk g is positions [c0 + g*m, c0 + (g+1)*m). Rank r's
micro-batch b (counted from the loader's start) is chunk b*W + r, and the DataLoader hands out a rank's batches
round-robin, so batch b comes from worker b mod K. A reader's chunks are thus those with g mod W = r and
(g div W) mod K = w. Steps of G = m*W*accum samples cover [t*G, (t+1)*G) for any W, m and accum while c0 sits on a
step boundary.

`ReadPlan` walks each epoch's order once (`data/global_order.py`) and keeps only its own positions with their
(shard, offset): N/(W*K) entries per epoch. For shards that must be streamed it also answers "which of my later
positions need this shard" (`shard_entries`), so such a shard is read once per epoch and reader.
"""

from __future__ import annotations

import numpy as np

from data.global_order import GlobalOrder


class EpochPlan:
    """A reader's own positions in one epoch (sorted) with their shard and offset."""

    def __init__(self, positions: np.ndarray, shards: np.ndarray, offsets: np.ndarray):
        self.positions, self.shards, self.offsets = positions, shards, offsets
        self._by_shard = None

    def shard_entries(self, shard: int, first: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, positions) of this reader's entries in `shard` at positions >= first."""
        if self._by_shard is None:
            order = np.lexsort((self.positions, self.shards))  # by shard, then position
            self._by_shard = (order, self.shards[order])
        order, sorted_shards = self._by_shard
        lo, hi = np.searchsorted(sorted_shards, [shard, shard + 1])
        rows = order[lo:hi]
        rows = rows[self.positions[rows] >= first]
        return self.offsets[rows], self.positions[rows]


class ReadPlan:
    """The positions and sample locations of reader (rank, worker); see the module docstring."""

    def __init__(self, order: GlobalOrder, *, start: int, batch_size: int, world_size: int, rank: int,
                 num_workers: int, worker: int):
        self.order = order
        self.start, self.m = start, batch_size
        self.world_size, self.rank = world_size, rank
        self.num_workers, self.worker = max(1, num_workers), worker
        self._epochs: dict[int, EpochPlan] = {}

    def chunk(self, batch: int) -> np.ndarray:
        """Global positions of this rank's micro-batch `batch` (counted from the loader's start), int64 [m]."""
        g = batch * self.world_size + self.rank
        return self.start + g * self.m + np.arange(self.m, dtype=np.int64)

    def owns(self, positions: np.ndarray) -> np.ndarray:
        """Whether each position belongs to this reader (bool, same shape)."""
        rel = positions - self.start
        g = rel // self.m
        return (rel >= 0) & (g % self.world_size == self.rank) & ((g // self.world_size) % self.num_workers
                                                                   == self.worker)

    def epoch(self, e: int) -> EpochPlan:
        """This reader's entries in epoch e (computed on first use, kept until `forget_before`)."""
        plan = self._epochs.get(e)
        if plan is None:
            n = self.order.num_samples
            pos, inputs = [], []
            if (e + 1) * n > self.start:  # an epoch wholly before the start has no entries
                for t0, block in self.order.epoch_blocks(e):
                    p = e * n + t0 + np.arange(len(block), dtype=np.int64)
                    mine = self.owns(p)
                    pos.append(p[mine])
                    inputs.append(block[mine])
            positions = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
            shards, offsets = self.order.locate(e, np.concatenate(inputs) if inputs else positions)
            plan = self._epochs[e] = EpochPlan(positions, shards, offsets)
        return plan

    def forget_before(self, e: int) -> None:
        """Drop the plans of epochs before e (the reader has moved past them)."""
        for old in [k for k in self._epochs if k < e]:
            del self._epochs[old]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset) of positions: own ones from the epoch plans, any others by walking their epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.owns(positions).all():
            return self.order.at(positions)
        shards, offsets = np.empty_like(positions), np.empty_like(positions)
        epochs = positions // self.order.num_samples
        for e in np.unique(epochs):
            plan, where = self.epoch(int(e)), epochs == e
            rows = np.searchsorted(plan.positions, positions[where])
            shards[where], offsets[where] = plan.shards[rows], plan.offsets[rows]
        return shards, offsets


__all__ = ["EpochPlan", "ReadPlan"]
