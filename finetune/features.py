"""The linear probe's on-disk feature cache (extraction itself: `launch/features.py`, shared with the k-NN monitor).

The cache (`RUN_DIR/features/<name>.safetensors`: features and labels, with its key in the metadata) is written by
the main process and read back without running code (safetensors). The key is made of the encoder identity (file
hash), the dataset (shard names, sizes, mtimes) and the transform; a different key means a stale cache: rebuilt. An
unreadable file is rebuilt too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from launch.run_files import FEATURES


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
    """`RUN_DIR/features/<name>.safetensors` = features [N, D] and labels [N], the key in the metadata; written
    atomically by the main process."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / FEATURES

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def load(self, name: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
            blob = load_file(str(p))
        except (SafetensorError, OSError, ValueError):  # unreadable cache: rebuild rather than fail
            return None
        return blob["features"], blob["labels"]

    def save(self, name: str, key: str, features: torch.Tensor, labels: torch.Tensor) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(name)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, p)
        return p


__all__ = ["dataset_fingerprint", "cache_key", "FeatureCache"]
