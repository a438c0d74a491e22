"""The live k-NN monitor: during a run, the top-1 of a weighted k-NN classifier on the current encoder's features.

A labelled split is the bank (by default the training split) and another one the queries (by default the val/test
split next to it). Both are fixed, deterministic subsets: the first samples of every shard, in proportion to the
shard sizes (`subset`), read by the exact-once evaluation stream with the evaluation transform, so each evaluation
sees the same images and costs `bank_size + query_size` encoder forwards. Every rank extracts its part and the
features are gathered on all ranks (`launch/features.py`); the vote is `launch/knn.py`. Without labels the monitor is
off, and `build_knn_monitor` says why in one line; bank and queries whose class names differ are refused.

Baselines (`KnnMonitor.baselines`): on the same bank and queries, the encoder at initialisation (`knn_top1_init`) and
the raw pixels (`knn_top1_pixels`: the normalised image average-pooled to `PIXEL_POOL` x `PIXEL_POOL` per channel,
flattened, the same cosine k-NN). A fresh run computes them once and writes `RUN_DIR/knn_baselines.json` (values and
what they were computed on); a resumed run reads them back. `knn_summary` says the final gain over both in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import DistributedType, broadcast_object_list

from core.errors import ConfigError
from data.device_input import device_batches
from data.eval_stream import EvalLoader, build_eval_loader
from data.info import DatasetError, DatasetInfo, neighbour_split, resolve
from data.transforms import eval_transform
from launch import run_files
from launch.accel import zero_stage
from launch.features import extract_features, extract_rows
from launch.knn import knn_top1
from models.pixel_encoder import PIXEL_POOL, pixel_features

BASELINE_KEYS = ("knn_top1_init", "knn_top1_pixels")


def subset(info: DatasetInfo, n: int | None) -> DatasetInfo:
    """The first `n` samples of the split, taken from every shard in proportion to its size (all of it when `n` is
    None or not smaller). Shards written by data/make_shards.py are shuffled, so this is an unbiased sample."""
    total = sum(info.shard_sizes or [])
    if n is None or n >= total:
        return info
    sizes = [n * s // total for s in info.shard_sizes]
    nonempty = [k for k, s in enumerate(info.shard_sizes) if s > 0]  # each holds more than its share (n < total)
    for k in nonempty[:n - sum(sizes)]:  # the remainder (fewer than the shards): one more from the first shards
        sizes[k] += 1
    keep = [k for k, s in enumerate(sizes) if s > 0]
    return replace(info, urls=[info.urls[k] for k in keep], shard_sizes=[sizes[k] for k in keep], num_samples=n)


def check_same_classes(bank: DatasetInfo, query: DatasetInfo, bank_name: str, query_name: str) -> None:
    """A `ConfigError` when bank and queries label differently: other class counts, or other class names (when both
    splits list them) at the same label index, which would make knn_top1 meaningless."""
    if bank.num_classes != query.num_classes:
        raise ConfigError(f"knn: the bank {bank_name} has {bank.num_classes} classes but the queries {query_name} "
                          f"{query.num_classes}; name splits of one dataset (knn.bank, knn.query)")
    names_b, names_q = bank.class_names, query.class_names
    if not names_b or not names_q or list(names_b) == list(names_q):
        return
    diff = next((i for i, (a, b) in enumerate(zip(names_b, names_q)) if a != b), min(len(names_b), len(names_q)))
    at = lambda names: repr(names[diff]) if diff < len(names) else "(none)"  # noqa: E731
    raise ConfigError(f"knn: the bank {bank_name} and the queries {query_name} name different classes: label {diff} "
                      f"is {at(names_b)} in the bank but {at(names_q)} in the queries; name splits of one dataset "
                      f"(knn.bank, knn.query)")


def labelled(spec: str | None, role: str, explicit: bool) -> tuple[DatasetInfo | None, str]:
    """The split's info when it has labels; else None and why (an error when the user named the split)."""
    if spec is None:
        return None, f"no {role} split (set knn.{role}=FOLDER:SPLIT)"
    try:
        info = resolve(spec)
    except DatasetError as exc:
        if explicit:
            raise ConfigError(f"knn.{role}: {exc}") from None
        return None, f"{role} split {spec}: {exc}"
    if info.labelled is False or not info.num_classes or info.shard_sizes is None:
        why = "has no labels" if info.shard_sizes is not None else "has no dataset.json with sample counts"
        if explicit:
            raise ConfigError(f"knn.{role}={spec} {why}; the k-NN monitor needs a labelled split with a dataset.json")
        return None, f"{role} split {spec} {why}"
    return info, ""


@contextlib.contextmanager
def root_unsharded(accelerator, encoder: nn.Module):
    """The monitor runs the encoder alone (`forward_features`), outside the whole model's forward, so parameters
    that only that forward gathers are gathered here and released after: under FSDP2 the root shard unit (patch
    embedding, tokens, final norm: FSDP2's `unshard`/`reshard`), under DeepSpeed ZeRO-3 the encoder's own parameters
    (class token, position table: `deepspeed.zero.GatheredParameters`). Blocks and other submodules gather theirs in
    their forward hooks. A no-op under other engines."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(encoder.parameters(recurse=False))):
            yield
        return
    model = accelerator._models[0] if getattr(accelerator, "_models", None) else None
    unshard = getattr(model, "unshard", None) if accelerator.distributed_type == DistributedType.FSDP else None
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        model.reshard()


@dataclass
class KnnMonitor:
    """`monitor(step) -> {"knn_top1": float}`; call it on every rank (the loop's hooks are)."""

    accelerator: object
    encoder: Callable[[], nn.Module]  # the current encoder (a timm VisionTransformer), looked up at each call
    bank: EvalLoader
    query: EvalLoader
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: torch.dtype = torch.float32
    k: int = 20
    temperature: float = 0.07
    pool: str = "token"
    bank_name: str = ""  # the bank's and the queries' specs, recorded with the baselines
    query_name: str = ""
    img_size: int | None = None
    init_top1: float | None = None  # knn_top1_init once `baselines` ran: the hook then also returns the gain over it
    last_top1: float | None = None  # the hook's latest knn_top1 (for `knn_summary` at the end of the run)

    def features(self, encoder: nn.Module, loader: EvalLoader) -> tuple[torch.Tensor, torch.Tensor]:
        batches = device_batches(loader, self.accelerator.device, mean=self.mean, std=self.std, dtype=self.dtype)
        return extract_features(encoder, batches, self.accelerator, self.pool, progress=False)

    def __call__(self, step: int) -> dict:
        top1 = self.last_top1 = self.encoder_top1(self.encoder())
        out = {"knn_top1": top1}
        if self.init_top1 is not None:
            out["knn_gain_init"] = top1 - self.init_top1  # for the progress bar: the gain over the encoder at init
        return out

    def encoder_top1(self, encoder: nn.Module) -> float:
        """knn_top1 of `encoder` (the hook's: the one the monitor follows; the baselines': the one at init)."""
        was_training = encoder.training
        device = self.accelerator.device
        # no RNG is drawn by an eval-mode forward, but the training streams must not move even if one were
        streams = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=streams), root_unsharded(self.accelerator, encoder):
            bank_x, bank_y = self.features(encoder, self.bank)
            query_x, query_y = self.features(encoder, self.query)
        encoder.train(was_training)
        return self.top1(bank_x, bank_y, query_x, query_y)

    def top1(self, bank_x, bank_y, query_x, query_y) -> float:
        device = self.accelerator.device
        return knn_top1(bank_x.to(device), bank_y.to(device), query_x.to(device), query_y, self.num_classes,
                        k=self.k, temperature=self.temperature)

    def setup(self) -> dict:
        """What the baselines were computed on; a cache describing anything else is not used."""
        return {"bank": self.bank_name, "query": self.query_name, "bank_size": self.bank.num_samples,
                "query_size": self.query.num_samples, "k": self.k, "temperature": self.temperature,
                "pool": self.pool, "pixel_pool": PIXEL_POOL, "img_size": self.img_size,
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}

    def pixel_rows(self) -> list[torch.Tensor]:
        """[bank features, bank labels, query features, query labels] of the raw-pixel baseline (`pixel_features` of
        the normalised images), extracted exactly once over the ranks and gathered on every rank."""
        rows = []
        for loader in (self.bank, self.query):
            batches = device_batches(loader, self.accelerator.device, mean=self.mean, std=self.std, dtype=self.dtype)
            rows += extract_rows(pixel_features, batches, self.accelerator, progress=False,
                                 empty_shape=(len(self.mean) * PIXEL_POOL ** 2,))
        return rows

    def pixel_top1(self) -> float:
        return self.top1(*self.pixel_rows())

    def baselines(self, run_dir: str | Path, init_encoder: nn.Module | None) -> dict:
        """`{"knn_top1_init", "knn_top1_pixels"}` (floats, or None when unknown), the same on every rank; call it on
        every rank. A fresh run passes the encoder as initialised (before the first step): both are computed and the
        main process writes `RUN_DIR/knn_baselines.json`. A resumed run passes None: the file answers when it
        describes this monitor's setup; otherwise the pixel baseline is recomputed and the init one is None (that
        encoder is gone). Sets `init_top1`, so the hook's records then carry `knn_gain_init`."""
        path = Path(run_dir) / run_files.KNN_BASELINES
        setup = self.setup()
        cached = [None]
        if init_encoder is None and self.accelerator.is_main_process:
            cached[0] = read_baselines(path, setup)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(cached, from_process=0)
        values, note = cached[0], None
        if values is None:
            if init_encoder is not None:
                values = {"knn_top1_init": self.encoder_top1(init_encoder), "knn_top1_pixels": self.pixel_top1()}
            else:
                values = {"knn_top1_init": None, "knn_top1_pixels": self.pixel_top1()}
                note = (f"knn: {path} is missing or describes another k-NN setup, and the encoder at init is gone "
                        f"(a resumed run): knn_top1_init is unknown for this run")
            shared = [values]
            if self.accelerator.num_processes > 1:  # every rank computed the same; rank 0's floats are the answer
                broadcast_object_list(shared, from_process=0)
            values = shared[0]
            if self.accelerator.is_main_process:
                write_baselines(path, values, setup, note)
                if note:
                    print(note, flush=True)
        self.init_top1 = values["knn_top1_init"]
        return dict(values)


def read_baselines(path: Path, setup: dict) -> dict | None:
    """The cached baselines when `path` holds them for exactly `setup`, else None (missing, unreadable, other setup)."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(blob, dict) or blob.get("setup") != json.loads(json.dumps(setup)):
        return None
    values = {k: blob.get(k) for k in BASELINE_KEYS}
    ok = all(v is None or isinstance(v, (int, float)) for v in values.values())
    return {k: None if v is None else float(v) for k, v in values.items()} if ok else None


def write_baselines(path: Path, values: dict, setup: dict, note: str | None = None) -> Path:
    """`knn_baselines.json` (values, setup, note), written atomically (JSON only: nothing in a run dir executes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {**values, "setup": setup, **({"note": note} if note else {})}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(blob, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def knn_summary(final_top1: float, init_top1: float | None, pixels_top1: float | None) -> str:
    """One line for the end of a run, e.g. `knn_top1 0.342: +6.1 points over the encoder at init (0.281), +3.0 over
    raw pixels (0.312)`; a negative gain reads `3.1 points below ...`; an unknown baseline is left out."""

    def versus(base: float, what: str, first: bool) -> str:
        points = 100 * (final_top1 - base)
        unit = " points" if first else ""
        if round(points, 1) >= 0:
            return f"+{points:.1f}{unit} over {what} ({base:.3f})"
        return f"{-points:.1f}{unit} below {what} ({base:.3f})"

    parts = [(b, w) for b, w in ((init_top1, "the encoder at init"), (pixels_top1, "raw pixels")) if b is not None]
    said = ", ".join(versus(b, w, i == 0) for i, (b, w) in enumerate(parts))
    return f"knn_top1 {final_top1:.3f}" + (f": {said}" if said else " (no baselines)")


def build_knn_monitor(*, bank: str | None, query: str | None, train: str, accelerator, encoder, img_size: int,
                      mean, std, bank_size: int | None, query_size: int | None, batch_size: int, num_workers: int,
                      dtype=torch.float32, k: int = 20, temperature: float = 0.07,
                      pool: str = "token") -> tuple[KnnMonitor | None, str]:
    """(monitor, one line describing it) or (None, why it is off). `bank`/`query` None: the training split and the
    val/test split next to it; named splits that are missing or unlabelled are a `ConfigError`."""
    bank_info, why = labelled(bank or train, "bank", explicit=bank is not None)
    query_info, why_q = labelled(query or neighbour_split(train), "query", explicit=query is not None)
    if bank_info is None or query_info is None:
        return None, f"knn: off ({why or why_q})"
    where = [bank or f"{train} (train)", query or neighbour_split(train)]
    check_same_classes(bank_info, query_info, *where)
    tf = eval_transform(img_size, mean, std)
    world, rank = accelerator.num_processes, accelerator.process_index
    loaders = [build_eval_loader(subset(info, n), batch_size=batch_size, transform=tf, rank=rank, world_size=world,
                                 num_workers=num_workers)
               for info, n in ((bank_info, bank_size), (query_info, query_size))]
    monitor = KnnMonitor(accelerator, encoder, *loaders, num_classes=bank_info.num_classes, mean=tuple(mean),
                         std=tuple(std), dtype=dtype, k=k, temperature=temperature, pool=pool, bank_name=where[0],
                         query_name=where[1], img_size=img_size)
    sizes = [loader.num_samples for loader in loaders]
    return monitor, (f"knn: bank {sizes[0]} images of {where[0]}, queries {sizes[1]} of {where[1]}, k={k}, "
                     f"T={temperature}, {pool} features")


__all__ = ["KnnMonitor", "build_knn_monitor", "subset", "root_unsharded", "PIXEL_POOL",
           "BASELINE_KEYS", "pixel_features", "check_same_classes", "read_baselines",
           "write_baselines", "knn_summary"]
