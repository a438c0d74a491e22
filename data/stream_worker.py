"""One reader's batches of the training stream: fetch its samples, decode and augment them, replace corrupt ones,
collate.

A reader (rank r, DataLoader worker w) makes the rank's micro-batches w, w+K, w+2K, ... (data/read_plan.py). Each
sample is fetched by (shard, offset): one positioned read for a local tar shard, or from the samples it kept when it
streamed that shard, once per epoch, for any other (data/shard_reader.py). Samples kept from a streamed shard are
dropped as soon as they are used.

Per-sample randomness follows the sample: the transform runs with Python's, NumPy's and torch's global RNGs seeded
from mix_seed(seed, "aug", epoch, sample id), and `sample_fn` gets mix_seed(seed, "sample", epoch, sample id). The
sample id is the sample's index in dataset order (shards as dataset.json lists them, samples in file order), not
its key: ids are unique and known before the sample is read, keys need not be (other tools' shards), and neither the
reader nor the shuffle (buffer size, shard order) changes a sample's crop in a given epoch.

Corrupt data (positions never shift): a sample that fails to decode, or one missing from its shard (a placeholder:
the file holds fewer samples than dataset.json records), is counted in the batch's `n_bad` and its row becomes a copy
of the next good sample of the batch (cyclic). A batch with no good sample copies the samples of the rank's next
micro-batch that has one, decoded here for the purpose (the same images that batch gets: the seeds follow the
samples), so the result does not depend on the number of workers. A copied row is the donor's whole record: image,
label, key, position and extras.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import get_worker_info

from data.decode import CorruptSample, decode_image, decode_label
from data.read_plan import ReadPlan
from data.seeding import mix_seed, seeded_global_rngs
from data.shard_reader import ShardReader

log = logging.getLogger(__name__)
RESERVED = ("image", "label", "key", "position", "n_corrupt", "n_bad")
MAX_WARNINGS = 5


class StreamWorker:
    """Batches of one reader of `stream` (a data.train_stream.TrainStream); `worker` in [0, K)."""

    def __init__(self, stream, worker: int):
        self.s = stream
        self.n = stream.order.num_samples
        self.plan = ReadPlan(stream.order, start=stream.start, batch_size=stream.batch_size,
                             world_size=stream.world_size, rank=stream.rank, num_workers=stream.num_workers,
                             worker=worker)
        self.reader = ShardReader(stream.urls, warn=self.warn)
        self.kept: dict[int, dict | None] = {}  # position -> raw sample, from streamed shards, until used
        self.in_main = get_worker_info() is None  # only there must the caller's RNG states be put back
        self.warnings = 0

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            log.warning("training stream: %s%s", message,
                        " (further warnings of this worker suppressed)" if self.warnings == MAX_WARNINGS else "")

    def batches(self) -> Iterator[dict]:
        b = self.plan.worker
        try:
            while True:
                yield self.batch(b)
                b += self.plan.num_workers
        finally:
            self.reader.close()

    def _raw(self, p: int, shard: int, offset: int, own: bool) -> dict | None:
        if self.reader.seekable(shard):
            return self.reader.read(shard, offset)
        if not own:  # a donor batch's sample: what this reader kept, else a one-off pass over the shard
            return self.kept[p] if p in self.kept else self.reader.stream(shard, [offset])[offset]
        if p not in self.kept:  # first need of this shard from here on in the epoch: keep all this reader needs
            offsets, positions = self.plan.epoch(p // self.n).shard_entries(shard, p)
            got = self.reader.stream(shard, offsets.tolist())
            self.kept.update(zip(positions.tolist(), (got[o] for o in offsets.tolist())))
        return self.kept.pop(p)

    def _item(self, p: int, shard: int, offset: int, own: bool) -> tuple | None:
        """(image, label, key, position, extras) of position p, or None when its sample is missing or corrupt."""
        s = self.s
        raw = self._raw(p, shard, offset, own)
        epoch, sample_id = p // self.n, int(s.order.sample_id(shard, offset))
        try:
            if raw is None:
                raise CorruptSample(f"sample {offset} of {s.urls[shard]} is missing (dataset.json records "
                                    f"{s.sizes[shard]})")
            img = decode_image(raw, s.decode_size)
            label = decode_label(raw)
            with seeded_global_rngs(mix_seed(s.seed, "aug", epoch, sample_id), restore=self.in_main):
                image = s.transform(img)
        except CorruptSample as exc:
            self.warn(f"skipping unreadable data: {exc}")
            return None
        extras = s.sample_fn(mix_seed(s.seed, "sample", epoch, sample_id)) if s.sample_fn is not None else {}
        clash = set(extras) & set(RESERVED)
        if clash:
            raise ValueError(f"sample_fn returned reserved batch keys {sorted(clash)}")
        return image, label, raw.get("__key__"), p, extras

    def _chunk(self, b: int, own: bool) -> list:
        positions = self.plan.chunk(b)
        shards, offsets = self.plan.locate(positions)
        return [self._item(int(p), int(j), int(o), own) for p, j, o in zip(positions, shards, offsets)]

    def _donors(self, b: int) -> list[tuple]:
        """The good samples of the rank's first micro-batch after b that has any."""
        limit = -(-self.n // (self.s.batch_size * self.s.world_size)) + 1  # a rank's batches in an epoch, + 1
        for k in range(1, limit + 1):
            good = [item for item in self._chunk(b + k, own=False) if item is not None]
            if good:
                return good
        raise RuntimeError(f"rank {self.s.rank}: no readable sample in {limit} micro-batches from position "
                           f"{int(self.plan.chunk(b)[0])}; are the shards readable? e.g. {self.s.urls[0]}")

    def batch(self, b: int) -> dict:
        """The rank's micro-batch b (counted from the loader's start), collated."""
        self.plan.forget_before(int(self.plan.chunk(b)[0]) // self.n)
        items = self._chunk(b, own=True)
        n_bad = sum(item is None for item in items)
        good = [q for q, item in enumerate(items) if item is not None]
        size = len(items)
        if not good:
            donors = self._donors(b)
            items = [donors[q % len(donors)] for q in range(size)]
        elif n_bad:  # nearest good sample after q, cyclic
            items = [item if item is not None else items[min(good, key=lambda g, q=q: (g - q) % size)]
                     for q, item in enumerate(items)]
        out = {
            "image": torch.stack([item[0] for item in items]),  # [B, C, H, W]
            "label": torch.tensor([item[1] for item in items], dtype=torch.long),  # [B]
            "key": [item[2] for item in items],
            "position": torch.tensor([item[3] for item in items], dtype=torch.int64),  # [B]
            "n_bad": n_bad,
        }
        for name in items[0][4]:
            out[name] = torch.stack([item[4][name] for item in items])  # [B, ...]
        return out


__all__ = ["StreamWorker"]
