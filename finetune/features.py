"""Frozen-encoder features: pooling, exact-once extraction over a split (both in `launch/features.py`, shared with the
pretraining k-NN monitor, re-exported here), and the on-disk feature cache.

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

from launch.features import encode, extract_features, gather_rows, pool_tokens  # re-exported: defined in launch/


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
