"""Evaluation stream: every image of a split exactly once over all ranks and workers, equal batch counts per rank.

The split's samples are numbered 0..N-1 in shard order (per-shard counts from dataset.json). Rank r takes the
contiguous range [r*N//W, (r+1)*N//W), which its K workers split again into contiguous ranges; a worker opens only
the shards that overlap its range and skips to its first sample without decoding. Every worker yields the same
number of batches M = ceil(largest worker range / B) (the last ones padded with `valid=False` entries), so
`len(loader) = K * M` on every rank and no rank waits on another. A corrupt image or a shard shorter than its
recorded count gives `valid=False` placeholders at those positions, never a shift, and marks them `corrupt`: each
lost sample is counted once, by position (the read error that cut a shard short is logged, not counted again).
Batches: `{"image" [B,C,H,W], "label" [B] (-1 unlabelled/padding), "valid" bool [B], "index" [B] (global sample
index, -1 for padding), "corrupt" bool [B] (a sample of the split that could not be read or decoded; never padding),
"n_corrupt" int (this rank's running total of corrupt entries)}`. Over all ranks, the sum of `corrupt` plus the
number of `valid` entries is the split's recorded size.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data.decode import CorruptSample, decode_image, decode_label
from data.info import DatasetError, DatasetInfo, resolve
from data.worker_signals import stop_signals_blocked, worker_init

log = logging.getLogger(__name__)

PLACEHOLDER_SIZE = 64  # side of the black image pushed through the transform to shape padding entries


def split_range(start: int, stop: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of `parts` contiguous, near-equal pieces of [start, stop)."""
    n = stop - start
    return start + n * i // parts, start + n * (i + 1) // parts


def count_samples(urls: list[str]) -> list[int]:
    """Samples per shard, by reading the shards (used only when no dataset.json records the counts)."""
    sizes = []
    for url in tqdm(urls, desc="counting eval samples", unit="shard", disable=len(urls) < 10):
        try:
            sizes.append(sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())))
        except Exception as exc:  # unreadable shard: fail at start-up, naming it
            raise DatasetError(f"cannot count the samples of {url}: {exc}") from exc
    return sizes


class EvalStream(IterableDataset):
    def __init__(self, info: DatasetInfo, *, batch_size: int, transform: Callable, rank: int, world_size: int,
                 num_workers: int, decode_size: int | None = None):
        super().__init__()
        self.urls = list(info.urls)
        self.sizes = list(info.shard_sizes)
        self.offsets = [0] + list(itertools.accumulate(self.sizes))  # global index of each shard's first sample
        self.total = self.offsets[-1]
        self.batch_size = batch_size
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.decode_size = decode_size
        self.n_corrupt = 0
        self._placeholder = None
        largest = max(self.worker_range(r, w)[1] - self.worker_range(r, w)[0]
                      for r in range(world_size) for w in range(self.num_workers))
        self.batches_per_worker = max(1, math.ceil(largest / batch_size))

    def worker_range(self, rank: int, worker: int) -> tuple[int, int]:
        lo, hi = split_range(0, self.total, self.world_size, rank)
        return split_range(lo, hi, self.num_workers, worker)

    def __len__(self) -> int:
        return self.num_workers * self.batches_per_worker

    def _on_read_error(self, exn: Exception) -> bool:
        """webdataset handler for shard read errors: log and go on. The samples the error cost are counted by
        position in `_samples` (the shard gave fewer than recorded), so the error itself is not counted."""
        log.warning("evaluation: error reading a shard: %s", exn)
        return True

    def _samples(self, lo: int, hi: int) -> Iterator[tuple[int, dict | None]]:
        """(global index, raw sample or None when missing) for every index in [lo, hi), in order."""
        if lo >= hi:
            return
        first = bisect.bisect_right(self.offsets, lo) - 1
        for k in range(first, len(self.urls)):
            start, end = self.offsets[k], self.offsets[k + 1]
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, end)
            raw = wds.DataPipeline(wds.SimpleShardList([self.urls[k]]),
                                   wds.tarfile_to_samples(handler=self._on_read_error))
            got = a
            for sample in itertools.islice(raw, a - start, b - start):  # skipped samples are never decoded
                yield got, sample
                got += 1
            if got < b:
                self.n_corrupt += b - got
                log.warning("evaluation: shard %s has %d fewer samples than recorded", self.urls[k], b - got)
                for g in range(got, b):
                    yield g, None

    def _decode(self, sample: dict | None) -> tuple[torch.Tensor | None, int]:
        """(image, label), or (None, -1) for a sample that is missing (already counted) or does not decode."""
        if sample is None:
            return None, -1
        try:
            return self.transform(decode_image(sample, self.decode_size)), decode_label(sample)
        except CorruptSample as exc:
            self.n_corrupt += 1
            log.warning("evaluation: skipping a corrupt sample: %s", exc)
            return None, -1

    def _pad_image(self, like: torch.Tensor | None) -> torch.Tensor:
        if like is not None:
            return torch.zeros_like(like)
        if self._placeholder is None:
            blank = Image.new("L", (PLACEHOLDER_SIZE,) * 2)
            self._placeholder = torch.zeros_like(self.transform(blank))  # any channels
        return self._placeholder

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        worker = wi.id if wi is not None else 0
        self.n_corrupt = 0  # counts restart with each pass over the split
        lo, hi = self.worker_range(self.rank, worker)
        samples = self._samples(lo, hi)
        for _ in range(self.batches_per_worker):
            chunk = list(itertools.islice(samples, self.batch_size))
            decoded = [(g, *self._decode(s)) for g, s in chunk]
            like = next((im for _, im, _ in decoded if im is not None), None)
            images = [im if im is not None else self._pad_image(like) for _, im, _ in decoded]
            images += [self._pad_image(like)] * (self.batch_size - len(images))
            pad = self.batch_size - len(decoded)
            yield {
                "image": torch.stack(images),  # [B, C, H, W]
                "label": torch.tensor([lab for _, _, lab in decoded] + [-1] * pad, dtype=torch.long),  # [B]
                "valid": torch.tensor([im is not None for _, im, _ in decoded] + [False] * pad),  # [B]
                "index": torch.tensor([g for g, _, _ in decoded] + [-1] * pad, dtype=torch.long),  # [B]
                "corrupt": torch.tensor([im is None for _, im, _ in decoded] + [False] * pad),  # [B]
                "n_corrupt": self.n_corrupt,
                "worker": worker,
            }


class EvalLoader:
    """`len()` batches on every rank; iterate as often as needed (each pass reads the split again)."""

    def __init__(self, stream: EvalStream, *, num_workers: int, pin_memory: bool = False,
                 worker_init_fn: Callable[[int], None] | None = None):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_init_fn = worker_init(worker_init_fn)  # workers ignore SIGTERM/SIGUSR1 (data/worker_signals.py)
        self.num_samples = stream.total

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(0)  # keeps DataLoader from drawing on the global torch RNG
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=gen, worker_init_fn=self.worker_init_fn)
        with stop_signals_blocked():  # the workers start with the stop signals blocked (data/worker_signals.py)
            batches = iter(loader)
        latest: dict[int, int] = {}
        n = 0
        for batch in batches:
            latest[batch.pop("worker")] = batch["n_corrupt"]
            batch["n_corrupt"] = sum(latest.values())
            n += 1
            yield batch
        if n != len(self):
            raise RuntimeError(f"evaluation loader gave {n} batches, expected {len(self)}")


def build_eval_loader(spec, *, batch_size: int, transform: Callable, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, decode_size: int | None = None, pin_memory: bool = False) -> EvalLoader:
    """Exactly-once evaluation loader over a split (see module docstring). Needs per-shard sample counts: from
    dataset.json, or (for bare patterns/URLs) by reading every shard once at start-up."""
    info = spec if isinstance(spec, DatasetInfo) else resolve(spec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if info.shard_sizes is None:
        log.warning("no dataset.json with shard sizes for %s...; counting samples by reading %d shards",
                    info.urls[0], len(info.urls))
        info = DatasetInfo(**{**info.__dict__, "shard_sizes": count_samples(info.urls)})
        info.num_samples = sum(info.shard_sizes)
    stream = EvalStream(info, batch_size=batch_size, transform=transform, rank=rank, world_size=world_size,
                        num_workers=num_workers, decode_size=decode_size)
    return EvalLoader(stream, num_workers=num_workers, pin_memory=pin_memory)
