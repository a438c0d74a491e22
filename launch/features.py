"""Encoder features over an evaluation stream: pooling, one batch, and exact-once extraction gathered on every rank.

Shared by the downstream runs (`finetune/`) and the pretraining k-NN monitor (`launch/knn_monitor.py`), so it lives
where both may import it. Extraction runs the eval loader (every image once across ranks, `valid` mask), keeps the
valid rows, and gathers them from all ranks (`pad_across_processes` + `gather`, trimmed to each rank's count), so
every rank ends with the whole split's features. `extract_rows` does this for any per-batch function (pooled
features, the k-NN monitor's raw-pixel baseline); `extract_tokens` keeps every token (fp16) for the attentive probe,
and `token_cache_plan` says whether such a cache fits in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil
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


def gather_rows(x: torch.Tensor, accelerator, max_bytes: int = 2 ** 28) -> torch.Tensor:
    """Concatenate a variable number of rows from every rank (rank order), on every rank, on the CPU. The rows travel
    through the device in slices of at most `max_bytes` per rank, so a large token cache never sits on it whole."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=device)).tolist()
    m = max(counts)
    row_bytes = max(1, math.prod(x.shape[1:]) * x.element_size())  # the same on every rank: one shape
    step = max(1, min(m, max_bytes // row_bytes)) if m else 1
    parts = [[] for _ in counts]  # per rank, its slices in order
    for lo in range(0, m, step):  # the same slices on every rank (m and step agree): collectives stay matched
        piece = x[lo: lo + step].to(device).contiguous()  # [<= step, ...]; empty past this rank's rows
        padded = accelerator.pad_across_processes(piece, dim=0)  # [s, ...], s = the longest piece this round
        everything = accelerator.gather(padded).cpu()  # [world * s, ...]
        s = padded.shape[0]
        for r, c in enumerate(counts):
            parts[r].append(everything[r * s: r * s + max(0, min(step, c - lo))])
    return torch.cat([p for rank_parts in parts for p in rank_parts]) if m else x.cpu()


def patch_tokens(encoder: nn.Module, images: torch.Tensor, include_prefix: bool = False) -> torch.Tensor:
    """Tokens of a batch after the final norm: `[N, L, D]` patch tokens, or `[N, prefix+L, D]` with the CLS (and any
    register) tokens first when `include_prefix`."""
    tokens = encoder.forward_features(images)  # [N, prefix+L, D]
    return tokens if include_prefix else tokens[:, getattr(encoder, "num_prefix_tokens", 1):]  # [N, L, D]


@torch.no_grad()
def extract_rows(fn: Callable[[torch.Tensor], torch.Tensor], batches, accelerator, *, desc: str = "features",
                 progress: bool = True, total: int | None = None, dtype: torch.dtype = torch.float32,
                 empty_shape: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """(`fn(images)` rows `[N, ...]` in `dtype` on the CPU, labels `[N]`) of every valid image of `batches` (device
    batches of the eval stream, `data.device_input.device_batches`), gathered from all ranks in rank order.
    `fn` runs under the accelerator's autocast; `empty_shape` is the trailing shape of a rank that saw no batch."""
    rows, labels = [], []
    show = progress and (accelerator is None or accelerator.is_main_process)
    for batch in tqdm(batches, desc=desc, disable=not show, total=total):
        images = batch["image"]
        valid = batch["valid"].to(torch.bool) if "valid" in batch else torch.ones(len(images), dtype=torch.bool)
        autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with autocast:
            r = fn(images)  # [B, ...]
        rows.append(r.to(dtype)[valid.to(r.device)].cpu())
        labels.append(batch["label"][valid.to(batch["label"].device)].cpu())
    local_r = torch.cat(rows) if rows else torch.zeros(0, *empty_shape, dtype=dtype)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return gather_rows(local_r, accelerator), gather_rows(local_y.long(), accelerator)


def extract_features(encoder: nn.Module, batches, accelerator, pool: str, desc: str = "features",
                     progress: bool = True, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features `[N, D]` float32, labels `[N]`) of every valid image of `batches` (device batches of the eval
    stream, `data.device_input.device_batches`), gathered from all ranks. Leaves the encoder in eval mode."""
    encoder.eval()
    return extract_rows(lambda images: encode(encoder, images, pool), batches, accelerator, desc=desc,
                        progress=progress, total=total, empty_shape=(getattr(encoder, "embed_dim", 0),))


def extract_tokens(encoder: nn.Module, batches, accelerator, *, include_prefix: bool = False, desc: str = "tokens",
                   progress: bool = True, total: int | None = None,
                   dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens `[N, T, D]` after the final norm in `dtype` (fp16: half the memory of float32; the attentive probe
    casts them back), labels `[N]`) of every valid image of `batches`, exactly once over all ranks and gathered on
    every rank, as `extract_features`. T is the patch count, plus the prefix tokens when `include_prefix`. Check
    `token_cache_plan` first: every rank holds the whole split. Leaves the encoder in eval mode."""
    encoder.eval()
    prefix = getattr(encoder, "num_prefix_tokens", 1) if include_prefix else 0
    patches = getattr(getattr(encoder, "patch_embed", None), "num_patches", 0)
    return extract_rows(lambda images: patch_tokens(encoder, images, include_prefix), batches, accelerator,
                        desc=desc, progress=progress, total=total, dtype=dtype,
                        empty_shape=(prefix + patches, getattr(encoder, "embed_dim", 0)))


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


__all__ = ["pool_tokens", "encode", "patch_tokens", "gather_rows", "extract_rows", "extract_features",
           "extract_tokens", "TokenCachePlan", "token_cache_plan", "available_memory", "local_world_size"]
