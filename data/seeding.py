"""Seeds derived from tuples of integers, and a context that seeds the global RNGs for one sample's transform.

The loaders make every random choice a function of the stream position: the shard draws of a (seed, rank, worker)
slot, its shuffle buffer, and each sample's augmentation all get seeds mixed from these integers (webdataset's own
resampling/shuffle seeds from pid and time, which makes streams irreproducible).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct

import numpy as np
import torch


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings; independent of process, platform and PYTHONHASHSEED."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        data = p.encode() if isinstance(p, str) else struct.pack("<q", int(p))
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int, restore: bool = True):
    """Seed Python's `random`, NumPy's legacy global RNG and torch's CPU RNG (what torchvision and timm transforms
    draw from) for one sample; with `restore`, put the previous states back afterwards, so running the loader in
    the main process (num_workers=0) leaves the training process's RNG streams untouched."""
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed % (2**32))
    # the CPU generator only: torch.manual_seed also seeds (and, before CUDA is initialised, queues with a
    # captured stack trace) every CUDA generator: 6x the cost of all three seeds here (docs/PERFORMANCE.md)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])
