"""The training stream's global sample order: a pure function of (seed, shard sizes, buffer size), on integers.

Epoch e of a split with N samples:
1. the shards in a seeded order (`shard_permutation`, from (seed, e)), each shard's samples in file order,
   concatenated: the epoch's input stream, inputs 0..N-1;
2. a buffer shuffle of size S over that stream (seeded from (seed, e)): the buffer first holds inputs 0..S-1; step
   j draws a slot k_j uniformly from [0, S), outputs the input held there and puts input S + j in its place; after
   the last input the S held inputs come out in a seeded random order (drained at the end of the epoch).
Every sample therefore comes out exactly once per epoch. The global stream is epoch 0's order, then epoch 1's, and
so on: global position p is epoch p // N, index p % N. Nothing depends on the number of ranks, workers or the
batch size, and nothing needs the data: each reader computes the order itself.

Random numbers are raw 64-bit outputs of NumPy's PCG64 bit generator (NumPy keeps bit-generator streams stable
across versions, which it does not promise for `Generator` methods), seeded with `data.seeding.mix_seed`.
k_j = raw_j mod S (bias below S / 2^64); shard and drain orders sort raw keys (a stable argsort).

Written by hand: webdataset's shuffle is per reader and seeded from the process; torchdata/litdata shuffle other
units. The buffer is replayed a block of steps at a time with NumPy (see `_steps`), about 0.1 us per sample (0.1-0.2
s for a 1.28M-sample epoch on the 2-core CI machine), so every reader can afford to walk each epoch to find its own
positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from data.seeding import mix_seed

BLOCK = 1 << 16  # buffer steps replayed at once (memory, not the result: the order does not depend on it)
ORDER_VERSION = "tessera-order/1"  # recorded in the loader state: a change of this definition is refused on resume


def _raw(seed: int) -> np.random.PCG64:
    return np.random.PCG64(seed)


def shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of `epoch` (int64 [num_shards])."""
    keys = _raw(mix_seed(seed, "shards", epoch)).random_raw(num_shards)
    return np.argsort(keys, kind="stable").astype(np.int64)


def _steps(held: np.ndarray, first_input: int, slots: np.ndarray) -> np.ndarray:
    """Outputs of consecutive buffer steps (int64 [L]), updating `held` (input index per slot) in place.

    Step i outputs what slot slots[i] holds and stores input first_input + i there. What it holds is the input
    stored by the previous step that drew the same slot, or held[slot] if no earlier step of this block did:
    grouping the steps by slot (stable sort, so step order within a group) finds that previous step for all at once.
    """
    order = np.argsort(slots, kind="stable")  # steps grouped by slot, in step order within each group
    grouped = slots[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]  # first step of its slot in this block
    previous = np.roll(order, 1)  # the step before, in the same group where not `first`
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.where(first, held[grouped], first_input + previous)
    last = np.ones(len(order), dtype=bool)
    last[:-1] = first[1:]  # last step of its slot: what the slot holds after the block
    held[grouped[last]] = first_input + order[last]
    return out


def buffer_order(n: int, size: int, seed: int, block: int = BLOCK) -> Iterator[np.ndarray]:
    """The buffer-shuffled order of inputs 0..n-1 (see the module docstring), in consecutive int64 blocks."""
    s = min(size, n)
    if s <= 1:  # no buffer: the inputs in order
        for a in range(0, n, block):
            yield np.arange(a, min(n, a + block), dtype=np.int64)
        return
    bits = _raw(seed)
    held = np.arange(s, dtype=np.int64)
    nxt = s  # next input to enter the buffer
    while nxt < n:
        count = min(block, n - nxt)
        slots = (bits.random_raw(count) % np.uint64(s)).astype(np.int64)
        yield _steps(held, nxt, slots)
        nxt += count
    yield held[np.argsort(bits.random_raw(s), kind="stable")]  # drain


class GlobalOrder:
    """position -> (shard, offset in shard) of the global stream over shards with known `sizes`."""

    def __init__(self, sizes: Sequence[int], seed: int, buffer: int):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if self.sizes.ndim != 1 or len(self.sizes) == 0 or (self.sizes < 0).any():
            raise ValueError(f"shard sizes must be a non-empty list of counts >= 0, got {list(sizes)[:5]}...")
        self.num_samples = int(self.sizes.sum())
        if self.num_samples == 0:
            raise ValueError("every shard is recorded as empty: nothing to train on")
        self.seed, self.buffer = int(seed), int(buffer)
        self.first_id = np.cumsum(self.sizes) - self.sizes  # dataset index of each shard's first sample

    def epoch_blocks(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index in epoch of the block's first output, input indices [L]) over the whole epoch."""
        t = 0
        for block in buffer_order(self.num_samples, self.buffer, mix_seed(self.seed, "buffer", epoch)):
            yield t, block
            t += len(block)

    def locate(self, epoch: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset) of the epoch's input indices (positions in its concatenated shard stream)."""
        perm = shard_permutation(len(self.sizes), self.seed, epoch)
        ends = np.cumsum(self.sizes[perm])
        k = np.searchsorted(ends, inputs, side="right")  # empty shards are stepped over
        return perm[k], inputs - (ends[k] - self.sizes[perm[k]])

    def sample_id(self, shard: np.ndarray | int, offset: np.ndarray | int):
        """A sample's index in dataset order (shards as listed, samples in file order): its identity."""
        return self.first_id[shard] + offset

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's input indices in output order (int64 [N]; tests and one-off look-ups)."""
        return np.concatenate([b for _, b in self.epoch_blocks(epoch)])

    def at(self, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset) at global positions (walks each epoch involved; meant for a few look-ups)."""
        positions = np.asarray(positions, dtype=np.int64)
        shard, offset = np.empty_like(positions), np.empty_like(positions)
        epochs = positions // self.num_samples
        for e in np.unique(epochs):
            where = epochs == e
            inputs = self.epoch_order(int(e))[positions[where] - e * self.num_samples]
            shard[where], offset[where] = self.locate(int(e), inputs)
        return shard, offset


__all__ = ["BLOCK", "GlobalOrder", "ORDER_VERSION", "buffer_order", "shard_permutation"]
