"""The on-disk cache of the attentive probe's token features: `RUN_DIR/features/<split>.tokens.safetensors`.

Tokens `[N, T, D]` (fp16, `launch.features.extract_tokens`) and labels `[N]` in one safetensors file whose metadata
holds the cache key (`finetune.features.cache_key`: encoder identity, dataset, transform, ...). safetensors, not
`torch.save`: nothing read back from a run directory can execute code. A missing, unreadable or differently keyed
file is a miss (the caller re-extracts); the main process writes it atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SUFFIX = ".tokens.safetensors"


class TokenCache:
    """`load(split, key) -> (tokens, labels) | None` and `save(split, key, tokens, labels) -> path`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / "features"

    def path(self, split: str) -> Path:
        return self.dir / f"{split}{SUFFIX}"

    def load(self, split: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.path(split)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return f.get_tensor("tokens"), f.get_tensor("labels")
        except Exception:  # unreadable or incomplete cache: rebuild rather than fail
            return None

    def save(self, split: str, key: str, tokens: torch.Tensor, labels: torch.Tensor) -> Path:
        if tokens.ndim != 3 or labels.shape != tokens.shape[:1]:
            raise ValueError(f"token cache {split}: expected tokens [N, T, D] and labels [N], got "
                             f"{tuple(tokens.shape)} and {tuple(labels.shape)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(split)
        tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
        save_file({"tokens": tokens.contiguous(), "labels": labels.long().contiguous()}, str(tmp),
                  metadata={"key": key})
        os.replace(tmp, p)
        return p


__all__ = ["TokenCache", "SUFFIX"]
