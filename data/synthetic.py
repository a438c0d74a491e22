"""`data.loader=synthetic`: random uint8 images of the run's shape and random labels, no I/O and no decoding, for
timing the training step alone (benchmarks, the planner) through the real entry points.

A few distinct batches are drawn once from a seeded generator and then cycled, so producing a batch costs nothing
next to the step; batches look like the stream's (`image` uint8 [B, C, H, W], `label`, `n_corrupt`, `key`) and go
through the same device normalisation. The position is a cursor of global samples, saved and restored like the
stream's (`data/train_stream.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data.seeding import mix_seed

POOL = 4  # distinct batches drawn once, then cycled


class SyntheticLoader:
    def __init__(self, *, batch_size: int, channels: int, img_size: int, num_classes: int = 10, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_sample: int = 0):
        if batch_size < 1 or channels < 1 or img_size < 1:
            raise ValueError(f"batch_size, channels and img_size must be >= 1, got {batch_size}, {channels}, "
                             f"{img_size}")
        self.batch_size, self.channels, self.img_size = batch_size, channels, img_size
        self.num_classes, self.seed, self.rank, self.world_size = max(1, num_classes), seed, rank, world_size
        self.batches = start_sample // (world_size * batch_size)  # this rank's batches so far
        gen = torch.Generator().manual_seed(mix_seed(seed, "synthetic", rank))
        self._pool = [(torch.randint(0, 256, (batch_size, channels, img_size, img_size), dtype=torch.uint8,
                                     generator=gen),  # [B, C, H, W]
                       torch.randint(0, self.num_classes, (batch_size,), generator=gen))
                      for _ in range(POOL)]

    def __iter__(self) -> Iterator[dict]:
        while True:
            images, labels = self._pool[self.batches % POOL]
            keys = [f"synthetic-{self.rank}-{self.batches}-{i}" for i in range(self.batch_size)]
            self.batches += 1
            yield {"image": images, "label": labels, "n_corrupt": 0, "key": keys}

    @property
    def cursor(self) -> int:
        return self.batches * self.world_size * self.batch_size

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["cursor"]) // (self.world_size * self.batch_size)


__all__ = ["SyntheticLoader", "POOL"]
