"""Seeded, resumable shard draws for the training stream, split over (rank, worker) slots.

Written by hand because webdataset's `ResampledShards` seeds itself from pid/time/urandom (not reproducible) and
samples with replacement (two slots may read the same shard at the same time). Here the draw sequence is the
concatenation of seeded permutations of all shards ("passes"): pass e is `Random(mix(seed, e))`'s permutation.
Draw t goes to slot t mod S (S = world_size * num_workers, slot = rank * num_workers + worker). So within one pass
every shard is read exactly once over all slots, no two slots read the same shard (when shards >= slots), and
every slot has an unbounded stream: equal-length streams on every rank. The sequence is a pure function of
(seed, number of shards), so a slot can jump to any draw without reading anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from data.seeding import mix_seed


def pass_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of pass `epoch`."""
    order = list(range(num_shards))
    random.Random(mix_seed(seed, "shards", epoch)).shuffle(order)
    return order


def slot_draws(num_shards: int, seed: int, slot: int, num_slots: int, start_draw: int = 0) -> Iterator[int]:
    """Shard indices read by `slot`, forever: global draws slot, slot + S, slot + 2S, ... (from `start_draw`,
    counted in this slot's own draws)."""
    if num_shards < 1:
        raise ValueError("no shards to draw from")
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} out of range for {num_slots} slots")
    t = slot + start_draw * num_slots
    epoch, perm = -1, []
    while True:
        e, i = divmod(t, num_shards)
        if e != epoch:
            epoch, perm = e, pass_permutation(num_shards, seed, e)
        yield perm[i]
        t += num_slots
