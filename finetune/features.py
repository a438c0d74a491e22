"""Frozen-encoder features: pooling, exact-once extraction over a split, and the on-disk feature cache.

Extraction runs the eval loader (every image once across ranks, `valid` mask), keeps the valid rows, and gathers
them from all ranks (`pad_across_processes` + `gather`, trimmed to each rank's count), so every rank ends with the
whole split's features. The cache (`RUN_DIR/features/<split>.pt`) stores a key made of the encoder identity (file
hash), the dataset (shard names, sizes, mtimes) and the transform; a different key means a stale cache: rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """`[N, T, D]` tokens after the final norm -> `[N, D]`: the CLS token, or the mean of the patch tokens."""
    if pool == "token":
        return tokens[:, 0]  # [N, D]
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)  # [N, D]
    raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")


def encode(encoder: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """Features of a batch through a timm VisionTransformer (`forward_features` ends with the final norm)."""
    tokens = encoder.forward_features(images)  # [N, 1+L, D]
    return pool_tokens(tokens, pool, getattr(encoder, "num_prefix_tokens", 1))


def gather_rows(x: torch.Tensor, accelerator) -> torch.Tensor:
    """Concatenate a variable number of rows from every rank (rank order), on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=device)).tolist()
    padded = accelerator.pad_across_processes(x.to(device).contiguous(), dim=0)  # [max_n, ...]
    everything = accelerator.gather(padded)  # [world * max_n, ...]
    m = padded.shape[0]
    return torch.cat([everything[r * m: r * m + c] for r, c in enumerate(counts)]).cpu()


@torch.no_grad()
def extract_features(encoder: nn.Module, batches, accelerator, pool: str, desc: str = "features",
                     progress: bool = True, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features `[N, D]` float32, labels `[N]`) of every valid image of `batches` (device batches of the eval
    stream, `data.device_input.device_batches`), gathered from all ranks."""
    encoder.eval()
    feats, labels = [], []
    show = progress and (accelerator is None or accelerator.is_main_process)
    for batch in tqdm(batches, desc=desc, disable=not show, total=total):
        images = batch["image"]
        valid = batch["valid"].to(torch.bool) if "valid" in batch else torch.ones(len(images), dtype=torch.bool)
        autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with autocast:
            f = encode(encoder, images, pool)  # [B, D]
        feats.append(f.float()[valid.to(f.device)].cpu())
        labels.append(batch["label"][valid.to(batch["label"].device)].cpu())
    local_f = torch.cat(feats) if feats else torch.zeros(0, getattr(encoder, "embed_dim", 0))
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return gather_rows(local_f, accelerator), gather_rows(local_y.long(), accelerator)


def dataset_fingerprint(urls: list[str]) -> list:
    """Shard names with size and mtime (local files), so rewritten shards invalidate the cache."""
    out = []
    for u in urls:
        p = Path(u)
        if p.is_file():
            st = p.stat()
            out.append([str(p.resolve()), st.st_size, int(st.st_mtime)])
        else:
            out.append([u])
    return out


def cache_key(*, encoder_identity: str, urls: list[str], transform, pool: str, extra: dict | None = None) -> str:
    return json.dumps({"encoder": encoder_identity, "dataset": dataset_fingerprint(urls), "transform": repr(transform),
                       "pool": pool, **(extra or {})}, sort_keys=True)


class FeatureCache:
    """`RUN_DIR/features/<split>.pt` = {"key", "features" [N, D], "labels" [N]}; written atomically by rank 0."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / "features"

    def path(self, split: str) -> Path:
        return self.dir / f"{split}.pt"

    def load(self, split: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.path(split)
        if not p.is_file():
            return None
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # unreadable cache: rebuild rather than fail
            return None
        if blob.get("key") != key:
            return None
        return blob["features"], blob["labels"]

    def save(self, split: str, key: str, features: torch.Tensor, labels: torch.Tensor) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(split)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "features": features.contiguous(), "labels": labels.contiguous()}, tmp)
        os.replace(tmp, p)
        return p


__all__ = ["pool_tokens", "encode", "gather_rows", "extract_features", "dataset_fingerprint", "cache_key",
           "FeatureCache"]
