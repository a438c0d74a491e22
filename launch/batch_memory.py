"""Start-up check of `data.micro_batch` against the split and the host's memory, before any loader worker starts.

    check_micro_batch(micro, info.num_samples, (in_chans, img_size, img_size), cfg.data.num_workers,
                      world_size=accelerator.num_processes, dtype="uint8")

An unbounded micro-batch (`data.micro_batch=100000000`) used to hang with no output while a loader worker grew
without bound. Refused in one line (`UserError` naming `data.micro_batch` and the numbers):
* a micro-batch larger than the images each process gets from the split (`num_samples // world_size`), when the
  split's size is known;
* batches in flight that do not fit the host's available memory (psutil): a batch is `micro_batch x C x H x W`
  values as the stream emits them (uint8 for 8-bit RGB, else float32), each process's loader holds
  `num_workers x prefetch` of them (torch's DataLoader `prefetch_factor`, 2 by default; 1 batch without workers),
  and every process on this host (`LOCAL_WORLD_SIZE`) has its own. This counts the loader's queue only (the batch a
  worker is stacking, pinned copies and the model come on top), so what it refuses cannot work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from core.errors import UserError

ITEM_BYTES = {"uint8": 1, "float32": 4}
TORCH_PREFETCH = 2  # torch.utils.data.DataLoader's default prefetch_factor with workers


def batches_in_flight(num_workers: int, prefetch: int = TORCH_PREFETCH) -> int:
    """Batches one process's loader holds at once: `num_workers x prefetch`, or the one being built without workers."""
    return num_workers * prefetch if num_workers > 0 else 1


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_micro_batch(micro_batch: int, num_samples: int | None, image_shape: Sequence[int], num_workers: int,
                      prefetch: int = TORCH_PREFETCH, *, world_size: int = 1, dtype: str = "uint8",
                      ranks_per_host: int | None = None, available: int | None = None,
                      key: str = "data.micro_batch") -> int:
    """Refuse (`UserError`, one line) a micro-batch larger than each process's share of a split of known size
    (`num_samples`, None: unknown), or whose batches in flight on this host exceed its available memory; returns that
    estimate in bytes. `image_shape`: [C, H, W] as the loader emits; `dtype`: "uint8" or "float32";
    `ranks_per_host`: None reads `LOCAL_WORLD_SIZE` (1 if unset); `available`: None asks psutil."""
    if dtype not in ITEM_BYTES:
        raise ValueError(f"dtype must be one of {sorted(ITEM_BYTES)}, got {dtype!r}")
    if num_samples is not None:
        per_rank = num_samples // max(world_size, 1)
        if micro_batch > per_rank:
            ranks = f" for each of {world_size} processes" if world_size > 1 else ""
            raise UserError(f"{key}={micro_batch:,} is more than the split's {per_rank:,} images{ranks} "
                            f"({num_samples:,} in all); lower {key} (or data.global_batch)")
    if ranks_per_host is None:
        ranks_per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    batch = micro_batch * math.prod(image_shape) * ITEM_BYTES[dtype]
    in_flight = batches_in_flight(num_workers, prefetch)
    total = batch * in_flight * ranks_per_host
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if total > available:
        shape = "x".join(str(int(d)) for d in image_shape)
        held = f"{num_workers} workers x prefetch {prefetch}" if num_workers > 0 else "no workers"
        procs = f" x {ranks_per_host} processes on this host" if ranks_per_host > 1 else ""
        raise UserError(f"{key}={micro_batch:,}: batches of {micro_batch:,} x {shape} {dtype} take {_gib(batch)} "
                        f"each; {in_flight} in flight per process ({held}){procs} need {_gib(total)}, more than the "
                        f"{_gib(available)} of memory available; lower {key} (or data.num_workers)")
    return total


__all__ = ["check_micro_batch", "batches_in_flight", "TORCH_PREFETCH"]
