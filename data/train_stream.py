"""Infinite, seeded, exactly resumable training stream over WebDataset shards: one global order, whatever the
number of ranks, loader workers or the micro-batch.

    global order (data/global_order.py) -> who reads what (data/read_plan.py) -> fetch by (shard, offset)
    (data/shard_reader.py, data/tar_index.py) -> decode + augment + collate (data/stream_worker.py)

Epoch e's order is a seeded permutation of the shards, each shard's samples in file order, concatenated, then a
seeded buffer shuffle of `shuffle_buffer` samples over that, drained at the epoch's end: every sample exactly once
per epoch, a pure function of (seed, shard sizes, buffer size). The stream's position is one number, the cursor:
global samples consumed. With micro-batch m and W ranks, rank r's micro-batch b (of a loader started at cursor c0)
is the global positions c0 + (b*W + r)*m ... + m; DataLoader worker b mod K makes it, reading and decoding only its
own batches' samples. Per-sample seeds follow the sample (see data/stream_worker.py). So batches are bitwise the
same for any `num_workers`, and for any W the ranks' micro-batch k together are the same samples in the same order.

Resume: `start_sample=c`, or `load_state_dict(state)`, continues at cursor c (a step boundary: step * global batch),
at any world size, worker count or micro-batch; only a change of seed, shards or buffer size is refused. Each
reader walks the order on integers to its positions (about 0.1 us per sample of an epoch): nothing before is read.

Shard sizes come from dataset.json. Without it, local shards are counted once at start-up (a header scan; a
streaming pass for compressed ones); remote shards are refused (write dataset.json with data/make_shards.py, and
point its `shard_url` at them: docs/DATA.md).

Corrupt and missing samples keep their positions: see data/stream_worker.py. `n_corrupt` in each batch is the
rank's running total since the loader was built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.global_order import ORDER_VERSION, GlobalOrder
from data.info import DatasetError, DatasetInfo, resolve
from data.seeding import mix_seed
from data.shard_reader import local_path
from data.stream_worker import StreamWorker
from data.tar_index import count_samples
from data.worker_signals import stop_signals_blocked, worker_init

log = logging.getLogger(__name__)
ORDER_FIELDS = ("order", "seed", "shuffle_buffer", "num_shards", "num_samples", "shard_sizes")  # checked on resume


class TrainStream(IterableDataset):
    """The per-worker stream of collated batches (use `build_train_loader`, which wraps it in a DataLoader)."""

    def __init__(self, info: DatasetInfo, *, batch_size: int, transform: Callable, seed: int, rank: int,
                 world_size: int, num_workers: int, start_sample: int = 0, shuffle_buffer: int = 1000,
                 decode_size: int | None = None, sample_fn: Callable[[int], dict] | None = None):
        super().__init__()
        self.urls = list(info.urls)
        self.sizes = list(info.shard_sizes)
        self.order = GlobalOrder(self.sizes, seed, shuffle_buffer)
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.start = start_sample
        self.shuffle_buffer = shuffle_buffer
        self.decode_size = decode_size
        self.sample_fn = sample_fn

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        if wi is not None and wi.num_workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers runs in {wi.num_workers}")
        return StreamWorker(self, wi.id if wi is not None else 0).batches()


def sizes_digest(sizes: list[int]) -> int:
    """A fingerprint of the per-shard counts (the order depends on each, not just on their sum)."""
    return mix_seed("shard-sizes", *sizes)


class TrainLoader:
    """Iterates rank batches forever; `cursor` = global samples consumed once every rank has taken as many batches
    as this one. `state_dict()` records it for exact resume."""

    def __init__(self, stream: TrainStream, *, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int | None = None, worker_init_fn: Callable[[int], None] | None = None):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.worker_init_fn = worker_init(worker_init_fn)  # workers ignore SIGTERM/SIGUSR1 (data/worker_signals.py)
        self.cursor = stream.start
        self.n_corrupt = 0

    def __iter__(self) -> Iterator[dict]:
        s = self.stream
        s.start = self.cursor  # a new iteration continues from the current position
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 and self.prefetch_factor else {}
        # own generator: DataLoader draws its workers' base seed from it instead of the global torch RNG
        gen = torch.Generator().manual_seed(mix_seed(s.seed, "loader", s.rank))
        loader = DataLoader(s, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=gen, worker_init_fn=self.worker_init_fn, **kw)
        with stop_signals_blocked():  # the workers start with the stop signals blocked (data/worker_signals.py)
            batches = iter(loader)
        for batch in batches:
            self.n_corrupt += batch.pop("n_bad")
            batch["n_corrupt"] = self.n_corrupt
            self.cursor += s.batch_size * s.world_size
            yield batch
        raise RuntimeError("training stream ended; it should be infinite")

    def state_dict(self) -> dict:
        """The position and what defines the order. `world_size`, `batch_size`, `num_workers` and `rank` are for
        the record only: a resume may change them."""
        s = self.stream
        return {"cursor": self.cursor, "order": ORDER_VERSION, "seed": s.seed, "shuffle_buffer": s.shuffle_buffer,
                "num_shards": len(s.urls), "num_samples": s.order.num_samples, "shard_sizes": sizes_digest(s.sizes),
                "world_size": s.world_size, "batch_size": s.batch_size, "num_workers": s.num_workers,
                "rank": s.rank}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor after checking that the order is the same (seed, shards, buffer size).

        `state["cursor"]` is the position. A `batches` key (micro-batches per rank, the earlier format that entry
        points still write as `step * accum`) takes precedence and means `batches * world_size * batch_size` of
        this loader. A state without `order` comes from the earlier per-(rank, worker) stream: its position is
        kept as a sample count, but the samples differ from the run's own continuation (a warning says so)."""
        s = self.stream
        mine = self.state_dict()
        if "order" not in state:
            log.warning("the loader state comes from the earlier per-worker stream: continuing at the same number "
                        "of samples, not with the same samples")
        fields = ORDER_FIELDS if "order" in state else ("seed", "num_shards")
        diff = [f"{k}: saved {state[k]} vs now {mine[k]}" for k in fields if k in state and state[k] != mine[k]]
        if diff:
            raise ValueError("cannot resume the training stream exactly, its order is defined differently: "
                             + "; ".join(diff))
        if "batches" in state:
            self.cursor = int(state["batches"]) * s.world_size * s.batch_size
        elif "cursor" in state:
            self.cursor = int(state["cursor"])
        else:
            raise ValueError(f"loader state has no cursor (keys: {sorted(state)})")


def known_sizes(info: DatasetInfo) -> list[int]:
    """Per-shard sample counts: dataset.json's, else counted now for local shards; remote ones are refused."""
    if info.shard_sizes is not None:
        return list(info.shard_sizes)
    remote = [u for u in info.urls if local_path(u) is None]
    if remote:
        raise DatasetError(f"{remote[0]}: the training stream needs each shard's sample count; give it a "
                           f"dataset.json (data/make_shards.py writes one; its \"shard_url\" can point at remote "
                           f"shards, docs/DATA.md)")
    log.warning("no dataset.json for %s...: counting the samples of %d shard(s) (write one with "
                "data/make_shards.py to skip this)", info.urls[0], len(info.urls))
    try:
        return [count_samples(local_path(u)) for u in info.urls]
    except Exception as exc:  # unreadable shard: fail at start-up, naming it
        raise DatasetError(f"cannot count the samples of {info.urls[0]}...: {exc}") from exc


def build_train_loader(spec, *, batch_size: int, transform: Callable, seed: int = 0, rank: int = 0,
                       world_size: int = 1, num_workers: int = 0, start_sample: int = 0, shuffle_buffer: int = 1000,
                       decode_size: int | None = None, pin_memory: bool = False,
                       prefetch_factor: int | None = None, worker_init_fn: Callable[[int], None] | None = None,
                       sample_fn: Callable[[int], dict[str, torch.Tensor]] | None = None) -> TrainLoader:
    """Infinite training loader of `{"image" [B,C,H,W], "label" [B] (-1 unlabelled), "key" [B], "position" int64
    [B] (global positions), "n_corrupt", **sample_fn outputs stacked}`.

    `spec`: anything `data.info.resolve` takes (or a DatasetInfo). `batch_size`: the micro-batch per rank.
    `start_sample`: the cursor to start at (global samples already consumed: step * global batch).
    `shuffle_buffer`: the global buffer shuffle's size in samples (integers only: it costs no memory for local tar
    shards). `decode_size`: decode JPEGs at reduced size (PIL draft) when both sides stay >= this.
    `sample_fn(seed) -> {name: tensor}`: per-sample extras made in the worker from the sample's own seed (draw only
    from a generator seeded with it), stacked into the batch. DataLoader workers ignore SIGTERM/SIGUSR1
    (pre-emption reaches only the rank); `worker_init_fn`, if given, runs after that in each worker.
    """
    info = spec if isinstance(spec, DatasetInfo) else resolve(spec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    sizes = known_sizes(info)
    if sum(sizes) == 0:
        raise DatasetError(f"no samples in the shards of {info.urls[0]}... (all recorded or counted as empty)")
    info = DatasetInfo(urls=list(info.urls), num_samples=sum(sizes), num_classes=info.num_classes,
                       class_names=info.class_names, shard_sizes=sizes, split=info.split, labelled=info.labelled,
                       meta=info.meta)
    stream = TrainStream(info, batch_size=batch_size, transform=transform, seed=seed, rank=rank,
                         world_size=world_size, num_workers=num_workers, start_sample=start_sample,
                         shuffle_buffer=shuffle_buffer, decode_size=decode_size, sample_fn=sample_fn)
    return TrainLoader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       worker_init_fn=worker_init_fn)
