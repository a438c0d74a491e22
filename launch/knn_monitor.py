"""The live k-NN monitor: during a run, the top-1 of a weighted k-NN classifier on the current encoder's features.

A labelled split is the bank (by default the training split) and another one the queries (by default the val/test
split next to it). Both are fixed, deterministic subsets: the first samples of every shard, in proportion to the
shard sizes (`subset`), read by the exact-once evaluation stream with the evaluation transform, so each evaluation
sees the same images and costs `bank_size + query_size` encoder forwards. Every rank extracts its part and the
features are gathered on all ranks (`launch/features.py`); the vote is `launch/knn.py`. Without labels the monitor is
off, and `build_knn_monitor` says why in one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from accelerate.utils import DistributedType

from core.errors import ConfigError
from data.device_input import device_batches
from data.eval_stream import EvalLoader, build_eval_loader
from data.info import DatasetError, DatasetInfo, neighbour_split, resolve
from data.transforms import eval_transform
from launch.features import extract_features
from launch.knn import knn_top1


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
def root_unsharded(accelerator):
    """Under FSDP2 the root shard unit's parameters (patch embedding, tokens, final norm) are gathered only by the
    whole model's forward; the monitor runs the encoder alone, so they are gathered here (FSDP2's `unshard`) and
    resharded after. The blocks gather their own in their forward hooks. A no-op under other engines."""
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

    def features(self, encoder: nn.Module, loader: EvalLoader) -> tuple[torch.Tensor, torch.Tensor]:
        batches = device_batches(loader, self.accelerator.device, mean=self.mean, std=self.std, dtype=self.dtype)
        return extract_features(encoder, batches, self.accelerator, self.pool, progress=False)

    def __call__(self, step: int) -> dict:
        encoder = self.encoder()
        was_training = encoder.training
        device = self.accelerator.device
        # no RNG is drawn by an eval-mode forward, but the training streams must not move even if one were
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), root_unsharded(self.accelerator):
            bank_x, bank_y = self.features(encoder, self.bank)
            query_x, query_y = self.features(encoder, self.query)
        encoder.train(was_training)
        top1 = knn_top1(bank_x.to(device), bank_y.to(device), query_x.to(device), query_y, self.num_classes,
                        k=self.k, temperature=self.temperature)
        return {"knn_top1": top1}


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
    if bank_info.num_classes != query_info.num_classes:
        raise ConfigError(f"knn: the bank has {bank_info.num_classes} classes but the queries "
                          f"{query_info.num_classes}; name splits of one dataset (knn.bank, knn.query)")
    tf = eval_transform(img_size, mean, std)
    world, rank = accelerator.num_processes, accelerator.process_index
    loaders = [build_eval_loader(subset(info, n), batch_size=batch_size, transform=tf, rank=rank, world_size=world,
                                 num_workers=num_workers)
               for info, n in ((bank_info, bank_size), (query_info, query_size))]
    monitor = KnnMonitor(accelerator, encoder, *loaders, num_classes=bank_info.num_classes, mean=tuple(mean),
                         std=tuple(std), dtype=dtype, k=k, temperature=temperature, pool=pool)
    sizes = [loader.num_samples for loader in loaders]
    where = [bank or f"{train} (train)", query or neighbour_split(train)]
    return monitor, (f"knn: bank {sizes[0]} images of {where[0]}, queries {sizes[1]} of {where[1]}, k={k}, "
                     f"T={temperature}, {pool} features")


__all__ = ["KnnMonitor", "build_knn_monitor", "subset"]
