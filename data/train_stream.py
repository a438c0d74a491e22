"""Infinite, seeded, exactly resumable training stream over WebDataset shards, split by rank and worker.

Per (rank, worker) slot the pipeline is one flat chain:

    seeded shard draws (data/shard_draws.py) -> wds.tarfile_samples per shard (raw bytes, never decoded here)
    -> seeded buffer shuffle (data/shuffle_buffer.py) -> wds.batched(B) raw chunks -> decode + augment + collate

Every random choice is a function of the position: the shard draws of slot (seed, rank, worker), its shuffle
buffer's RNG, and each sample's augmentation seed (seed, rank, worker, sample index in the slot). The DataLoader
hands out worker batches round-robin and in order, so batch b of a rank is batch b // K of worker b % K
(K = num_workers, or 1 in the main process) and the stream position is just the number of batches consumed.

Resume (`start_batch=k` or `TrainLoader.load_state_dict`): each worker works out how many raw samples it has
delivered. With per-shard counts (dataset.json) it replays only the shuffle buffer's RNG on integers to learn which
inputs the buffer holds, reads just those samples and jumps to the current shard and offset: nothing before is
read. Without counts it replays the raw stream, reading but not decoding the skipped samples. Either way the
continuation is bitwise identical to the uninterrupted stream.

With known counts a shard always yields its recorded number of samples (a truncated shard's missing ones become
placeholders), so positions never shift. A sample that fails to decode, or a placeholder, is counted and replaced
inside its batch by the next good sample of the batch; a batch with no good sample borrows the images of the next
batch that has one. Every batch thus holds B images and comes from exactly its own B raw samples. `n_corrupt` in
each batch is the rank's running total (all workers) since the loader (re)started: each skipped sample position
once per pass over it (the read error that cut a shard short is logged, not counted on top of the samples it cost).
Without counts the number of samples a truncated shard lost is unknown: its read error counts as one.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.decode import CorruptSample, decode_image, decode_label
from data.info import DatasetInfo, resolve
from data.seeding import mix_seed, seeded_global_rngs
from data.shard_draws import slot_draws
from data.shuffle_buffer import buffer_shuffle, fast_forward, restore_buffer
from data.worker_signals import stop_signals_blocked, worker_init

log = logging.getLogger(__name__)


def worker_batches_consumed(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of the first `start_batch` rank batches came from `worker` under round-robin order."""
    return max(0, (start_batch - worker + num_workers - 1) // num_workers)


class _SlotCounters:
    """Per-worker counters shared by the stages of one slot's pipeline."""

    def __init__(self, max_empty_draws: int, count_read_errors: bool):
        self.n_corrupt = 0
        self.empty_draws = 0
        self.max_empty_draws = max_empty_draws
        self.count_read_errors = count_read_errors  # only when shard sizes are unknown (no placeholders)
        self.warned = 0

    def _warn(self, what: str, exn: Exception) -> None:
        if self.warned < 5:
            self.warned += 1
            log.warning("%s: %s", what, exn)

    def on_error(self, exn: Exception) -> bool:
        """A sample that cannot be used (corrupt image, or a placeholder for one missing from its shard): count it."""
        self.n_corrupt += 1
        self._warn("skipping unreadable data", exn)
        return True

    def on_read_error(self, exn: Exception) -> bool:
        """webdataset handler for shard read errors: warn and go on. With known shard sizes the samples the error
        cost become placeholders, counted one by one; without sizes the error itself counts once."""
        if self.count_read_errors:
            self.n_corrupt += 1
        self._warn("error reading a shard", exn)
        return True


class TrainStream(IterableDataset):
    """The per-worker stream of collated batches (use `build_train_loader`, which wraps it in a DataLoader)."""

    def __init__(self, info: DatasetInfo, *, batch_size: int, transform: Callable, seed: int, rank: int,
                 world_size: int, num_workers: int, start_batch: int = 0, shuffle_buffer: int = 1000,
                 decode_size: int | None = None):
        super().__init__()
        self.urls = list(info.urls)
        self.sizes = list(info.shard_sizes) if info.shard_sizes is not None else None
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.decode_size = decode_size

    def _slot(self) -> tuple[int, int]:
        """(logical worker, slot). The DataLoader always starts its round-robin at process 0, so after a resume at
        batch k process p plays logical worker (p + k) mod K: the rank's batch order stays what it was."""
        wi = get_worker_info()
        if wi is not None and wi.num_workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers runs in {wi.num_workers}")
        worker = ((wi.id if wi is not None else 0) + self.start_batch) % self.num_workers
        return worker, self.rank * self.num_workers + worker

    def _read_shard(self, shard: int, counters: _SlotCounters) -> Iterator[dict | None]:
        """Raw samples of one shard (never decoded). With known shard sizes the shard yields exactly its recorded
        count: missing samples (truncated shard) become None placeholders, so input positions never shift."""
        url = self.urls[shard]
        samples = wds.tarfile_samples(iter([{"url": url}]), handler=counters.on_read_error)
        if self.sizes is None:
            got = 0
            for sample in samples:
                got += 1
                yield sample
        else:
            got = 0
            for sample in itertools.islice(samples, self.sizes[shard]):
                got += 1
                yield sample
            if got < self.sizes[shard]:
                log.warning("shard %s gave %d of %d recorded samples", url, got, self.sizes[shard])
                yield from itertools.repeat(None, self.sizes[shard] - got)
        counters.empty_draws = 0 if got else counters.empty_draws + 1
        if counters.empty_draws > counters.max_empty_draws:
            raise RuntimeError(f"rank {self.rank}: {counters.empty_draws} shard draws in a row gave no sample; "
                               f"are the shards readable? e.g. {self.urls[0]}")

    def _locate(self, draws: list[int], index: int) -> tuple[int, int]:
        """(draw number, offset in that draw's shard) of a slot's input index (shard sizes known)."""
        for d, shard in enumerate(draws):
            if index < self.sizes[shard]:
                return d, index
            index -= self.sizes[shard]
        raise AssertionError("draw list too short")

    def _draws_covering(self, slot: int, n_inputs: int) -> list[int]:
        """This slot's shard draws, enough of them to hold its first n_inputs inputs."""
        draws, total = [], 0
        for shard in slot_draws(len(self.urls), self.seed, slot, self.world_size * self.num_workers):
            draws.append(shard)
            total += self.sizes[shard]
            if total > n_inputs:
                return draws
            if len(draws) > len(self.urls) and total == 0:
                raise RuntimeError(f"every shard of {self.urls[0]}... is recorded as empty")

    def __iter__(self) -> Iterator[dict]:
        worker, slot = self._slot()
        counters = _SlotCounters(max_empty_draws=len(self.urls) + 1, count_read_errors=self.sizes is None)
        skip_batches = worker_batches_consumed(self.start_batch, worker, self.num_workers)
        n_skip = skip_batches * self.batch_size  # raw samples this worker already delivered
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        rng = random.Random(mix_seed(self.seed, "shuffle", self.rank, worker))

        def inputs(start_draw: int = 0, offset: int = 0):  # the slot's raw samples, shard after shard
            draws = slot_draws(len(self.urls), self.seed, slot, self.world_size * self.num_workers, start_draw)
            for d, shard in enumerate(draws):
                samples = self._read_shard(shard, counters)
                yield from (itertools.islice(samples, offset, None) if d == 0 else samples)

        if n_skip == 0:
            source = buffer_shuffle(inputs(), size, rng)
        elif self.sizes is None:  # counts unknown: replay the stream, reading but not decoding the skipped part
            source = itertools.islice(buffer_shuffle(inputs(), size, rng), n_skip, None)
        else:  # counts known: jump straight to the position, fetch only what the shuffle buffer held
            held = fast_forward(size, n_skip, rng)
            draws = self._draws_covering(slot, size + n_skip)
            initial = restore_buffer(held, lambda idx: self._fetch(draws, idx, counters))
            source = buffer_shuffle(inputs(*self._locate(draws, size + n_skip)), size, rng, initial=initial)

        def decode_batches(src):
            return self._batches(iter(src), skip_batches, worker, counters)

        return iter(wds.DataPipeline(
            lambda: source,
            wds.batched(self.batch_size, collation_fn=None, partial=False),
            decode_batches,
        ))

    def _fetch(self, draws: list[int], indices: list[int], counters: _SlotCounters) -> dict[int, dict | None]:
        """Raw samples at the given (sorted) slot input indices, reading only the shards that hold them."""
        by_draw: dict[int, list[tuple[int, int]]] = {}
        for i in indices:
            d, off = self._locate(draws, i)
            by_draw.setdefault(d, []).append((off, i))
        got = {}
        for d, wanted in sorted(by_draw.items()):
            offsets = dict(wanted)
            for off, sample in enumerate(itertools.islice(self._read_shard(draws[d], counters), max(offsets) + 1)):
                if off in offsets:
                    got[offsets[off]] = sample
        return got

    def _decode_chunk(self, chunk: list, j: int, worker: int, counters: _SlotCounters) -> list[tuple]:
        """Decode + augment chunk j of this slot: (image or None when corrupt, label, key) per sample."""
        out = []
        in_main = get_worker_info() is None  # only there must the caller's RNG states be put back
        for q, sample in enumerate(chunk):
            index = j * self.batch_size + q  # sample index within this slot's stream
            try:
                if sample is None:
                    raise CorruptSample(f"sample {index} of rank {self.rank} worker {worker} missing from its shard")
                img = decode_image(sample, self.decode_size)
                label = decode_label(sample)
                with seeded_global_rngs(mix_seed(self.seed, "aug", self.rank, worker, index), restore=in_main):
                    out.append((self.transform(img), label, sample.get("__key__")))
            except CorruptSample as exc:
                counters.on_error(exc)
                out.append((None, -1, None))
        return out

    def _batches(self, chunks: Iterator[list], first: int, worker: int, counters: _SlotCounters) -> Iterator[dict]:
        """Collated batches. A corrupt sample takes the image of the next good sample of its batch (cyclic); a
        batch with no good sample at all borrows from the next batch that has one (read ahead), so batch j
        always comes from raw chunk j and the position stays exact."""
        ahead: collections.deque = collections.deque()
        next_j = first

        def pull() -> bool:
            nonlocal next_j
            chunk = next(chunks, None)
            if chunk is None:
                return False
            ahead.append(self._decode_chunk(chunk, next_j, worker, counters))
            next_j += 1
            return True

        while ahead or pull():
            k = 0
            while not any(im is not None for im, _, _ in ahead[k]):
                k += 1
                if k == len(ahead) and not pull():
                    return
            donors = [d for d in ahead[k] if d[0] is not None]
            items = ahead.popleft()
            n = len(items)
            if k == 0:  # borrow within the batch: nearest good sample after q, cyclic
                good = [q for q, d in enumerate(items) if d[0] is not None]
                items = [d if d[0] is not None else items[min(good, key=lambda g: (g - q) % n)]
                         for q, d in enumerate(items)]
            else:
                items = [donors[q % len(donors)] for q in range(n)]
            yield {
                "image": torch.stack([im for im, _, _ in items]),  # [B, C, H, W]
                "label": torch.tensor([lab for _, lab, _ in items], dtype=torch.long),  # [B]
                "n_corrupt": counters.n_corrupt,  # this worker's running total; TrainLoader sums over workers
                "key": [key for _, _, key in items],
                "worker": worker,
            }


class TrainLoader:
    """Iterates rank batches forever, counting them; `state_dict()` records the position for exact resume."""

    def __init__(self, stream: TrainStream, *, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int | None = None, worker_init_fn: Callable[[int], None] | None = None):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.worker_init_fn = worker_init(worker_init_fn)  # workers ignore SIGTERM/SIGUSR1 (data/worker_signals.py)
        self.batches = stream.start_batch

    def __iter__(self) -> Iterator[dict]:
        self.stream.start_batch = self.batches  # a new iteration continues from the current position
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 and self.prefetch_factor else {}
        # own generator: DataLoader draws its workers' base seed from it instead of the global torch RNG
        gen = torch.Generator().manual_seed(mix_seed(self.stream.seed, "loader", self.stream.rank))
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=gen, worker_init_fn=self.worker_init_fn, **kw)
        latest: dict[int, int] = {}
        with stop_signals_blocked():  # the workers start with the stop signals blocked (data/worker_signals.py)
            batches = iter(loader)
        for batch in batches:
            latest[batch.pop("worker")] = batch["n_corrupt"]
            batch["n_corrupt"] = sum(latest.values())
            self.batches += 1
            yield batch
        raise RuntimeError("training stream ended; it should be infinite")

    def state_dict(self) -> dict:
        s = self.stream
        return {"batches": self.batches, "seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                "num_workers": s.num_workers, "batch_size": s.batch_size, "shuffle_buffer": s.shuffle_buffer,
                "num_shards": len(s.urls)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (same as `start_batch=state["batches"]`), after checking that the
        stream is built the same way (seed, world size, workers, batch size, buffer, shards)."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state[k]} vs now {mine[k]}" for k in mine
                if k not in ("batches", "rank") and k in state and state[k] != mine[k]]
        if diff:
            raise ValueError("cannot resume the training stream exactly, it is built differently: " + "; ".join(diff))
        self.batches = int(state["batches"])


def build_train_loader(spec, *, batch_size: int, transform: Callable, seed: int = 0, rank: int = 0,
                       world_size: int = 1, num_workers: int = 0, start_batch: int = 0, shuffle_buffer: int = 1000,
                       decode_size: int | None = None, pin_memory: bool = False,
                       prefetch_factor: int | None = None,
                       worker_init_fn: Callable[[int], None] | None = None) -> TrainLoader:
    """Infinite training loader of `{"image" [B,C,H,W], "label" [B] (-1 unlabelled), "n_corrupt", "key"}`.

    `spec`: anything `data.info.resolve` takes (or a DatasetInfo). `batch_size` is per rank (each worker yields
    whole batches). `decode_size`: decode JPEGs at reduced size (PIL draft) when both sides stay >= this.
    Exact resume needs the same seed, world_size, num_workers, batch_size, shuffle_buffer and shards.
    DataLoader workers ignore SIGTERM/SIGUSR1 (pre-emption reaches only the rank); `worker_init_fn`, if given, runs
    after that in each worker.
    """
    info = spec if isinstance(spec, DatasetInfo) else resolve(spec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    slots = world_size * max(1, num_workers)
    if len(info.urls) < slots:
        log.warning("%d shards for %d (rank, worker) slots: some slots will read the same shards at the same "
                    "time; write more shards (data/make_shards.py --shard-size)", len(info.urls), slots)
    stream = TrainStream(info, batch_size=batch_size, transform=transform, seed=seed, rank=rank,
                         world_size=world_size, num_workers=num_workers, start_batch=start_batch,
                         shuffle_buffer=shuffle_buffer, decode_size=decode_size)
    return TrainLoader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       worker_init_fn=worker_init_fn)
