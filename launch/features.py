"""Encoder outputs over an evaluation stream, exactly once across ranks and gathered on every rank: pooled features
(the probe, the k-NN monitor) and patch tokens (the attentive probe). Pooling itself is `models/pooling.py`.

Extraction runs the eval loader (every image once across ranks, `valid` mask), keeps the valid rows, and gathers
them from all ranks (`pad_across_processes` + `gather`, trimmed to each rank's count, in bounded slices), so every
rank ends with the whole split's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from models.pooling import encode, patch_tokens


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


__all__ = ["gather_rows", "extract_rows", "extract_features", "extract_tokens"]
