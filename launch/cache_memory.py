"""Whether a feature or token cache fits in memory: every process on a machine holds its own copy of the whole split
(fp16 tokens: N x T x D x 2 bytes), against a fraction of the memory available now (host RAM, or free CUDA memory).
What the attentive probe asks before caching tokens; it streams them otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch


def local_world_size() -> int:
    """Processes on this machine (the launchers' LOCAL_WORLD_SIZE; 1 without one): each holds its own token cache."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now: on a CUDA device its free memory (`torch.cuda.mem_get_info`), else the host's available RAM
    (`psutil.virtual_memory().available`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class TokenCachePlan:
    """Whether `copies` caches of `n x tokens x dim` values (`bytes_per_value` each) fit `fraction` of `available`."""

    n: int
    tokens: int
    dim: int
    copies: int
    bytes_per_value: int
    fraction: float
    available: int

    @property
    def bytes_needed(self) -> int:
        return self.n * self.tokens * self.dim * self.bytes_per_value * self.copies

    @property
    def budget(self) -> int:
        return int(self.available * self.fraction)

    @property
    def fits(self) -> bool:
        return self.bytes_needed <= self.budget

    def __str__(self) -> str:
        gib = 2 ** 30
        verdict = "fits in" if self.fits else "exceeds"
        return (f"token cache {self.n} x {self.tokens} x {self.dim} x {self.bytes_per_value} B x {self.copies} "
                f"process(es) = {self.bytes_needed / gib:.2f} GiB {verdict} {self.fraction:.0%} of "
                f"{self.available / gib:.2f} GiB available")


def token_cache_plan(n: int, tokens: int, dim: int, *, fraction: float = 0.5, copies: int | None = None,
                     available: int | None = None, device: torch.device | str = "cpu",
                     bytes_per_value: int = 2) -> TokenCachePlan:
    """The memory a token cache needs against a budget: `n x tokens x dim x bytes_per_value` (fp16: 2) for each of
    `copies` processes on this machine (None: `local_world_size()`), against `fraction` of `available` bytes (None:
    `available_memory(device)` now). `.fits` says whether to cache (else stream: an encoder forward per step)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if min(n, tokens, dim) < 0:
        raise ValueError(f"token cache sizes must be >= 0, got {n} x {tokens} x {dim}")
    return TokenCachePlan(n, tokens, dim, copies if copies is not None else local_world_size(), bytes_per_value,
                          fraction, available if available is not None else available_memory(device))


__all__ = ["TokenCachePlan", "token_cache_plan", "available_memory", "local_world_size"]
