"""A seeded buffer shuffle whose state after n outputs can be computed without the data (for exact, cheap resume).

Hand-written because webdataset's `shuffle` keeps its buffer inside a generator, so a resumed stream could only
rebuild it by reading every earlier sample again. Here the buffer first fills with `size` inputs; then each new
input replaces a uniformly drawn buffer slot, whose old content is emitted. Output t therefore consumes input
`size + t`, and which input sits in which slot after n outputs depends only on the RNG: `fast_forward` replays
that on integers (about a microsecond per skipped sample) and says which input indices to fetch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def fast_forward(size: int, n_out: int, rng: random.Random) -> list[int]:
    """Input indices held by the buffer after `n_out` outputs (slot order); advances `rng` as the real run would.
    The next input to read is then `size + n_out`."""
    if size <= 1:
        return []
    buf = list(range(size))
    randrange = rng.randrange
    for t in range(n_out):
        buf[randrange(size)] = size + t
    return buf


def buffer_shuffle(inputs: Iterable[T], size: int, rng: random.Random,
                   initial: list[T] | None = None) -> Iterator[T]:
    """Shuffle an (infinite) stream with a buffer of `size`; `initial` is a buffer restored by `fast_forward`
    (the inputs then continue after it). At the end of a finite stream the buffer is drained in random order."""
    if size <= 1:  # no buffer: `fast_forward` returns [] and the inputs pass through
        yield from inputs
        return
    it = iter(inputs)
    buf = list(initial) if initial is not None else []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        k = rng.randrange(size)
        buf[k], x = x, buf[k]
        yield x
    while buf:
        yield buf.pop(rng.randrange(len(buf)))


def restore_buffer(indices: list[int], fetch: Callable[[list[int]], dict[int, T]]) -> list[T]:
    """The buffer contents for `fast_forward`'s indices, fetched in one go (sorted) by `fetch`."""
    got = fetch(sorted(set(indices)))
    return [got[i] for i in indices]
