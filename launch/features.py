"""Encoder features over an evaluation stream: exact-once extraction gathered on every rank (pooling is in
`models/pooling.py`).

Shared by the downstream runs (`finetune/`) and the pretraining k-NN monitor (`launch/knn_monitor.py`), so it lives
where both may import it. Extraction runs the eval loader (every image once across ranks, `valid` mask), keeps the
valid rows, and gathers them from all ranks (`pad_across_processes` + `gather`, trimmed to each rank's count), so
every rank ends with the whole split's features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

from models.pooling import encode


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
    stream, `data.device_input.device_batches`), gathered from all ranks. Leaves the encoder in eval mode."""
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


__all__ = ["gather_rows", "extract_features"]
