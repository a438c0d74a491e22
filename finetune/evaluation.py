"""Evaluation of a classifier over a split: top-k accuracy over exactly the split's images, and eval.json.

The eval loader pads ranks to equal batch counts and marks real samples with `valid`; only those are counted and the
hits are summed across ranks, so `n_images` equals the split size whatever the number of processes.
`evaluate_model` runs one pass; `write_eval_json` writes the result on the main process, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from launch.config import ConfigError
from launch.metrics import json_safe


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Per-sample hits `[N, len(ks)]` (bool): is the label among the k highest logits? (k capped at the classes)"""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top.eq(labels[:, None])  # [N, kmax]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1) for k in ks], dim=1)  # [N, len(ks)]


class AccuracyMeter:
    """Accumulates top-1/top-5 hits and the image count of valid samples; `compute` sums over ranks."""

    def __init__(self, ks: tuple[int, ...] = (1, 5), device: torch.device | str = "cpu") -> None:
        self.ks = ks
        self.sums = torch.zeros(len(ks) + 1, dtype=torch.float64, device=device)  # hits per k, then count
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.corrupt = torch.zeros((), dtype=torch.float64, device=device)  # images of the split that did not decode

    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
               loss_per_sample: torch.Tensor | None = None, corrupt: torch.Tensor | None = None) -> None:
        if corrupt is not None:  # the eval stream's per-entry mask of unreadable images
            self.corrupt += corrupt.to(self.corrupt.device).double().sum()
        if valid is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        valid = valid.to(torch.bool)
        if bool((labels[valid] < 0).any()):
            raise ConfigError("the evaluated split has unlabelled images (label -1); evaluation needs labels")
        logits, labels = logits[valid].float(), labels[valid]
        hits = topk_correct(logits, labels, self.ks).to(self.sums.dtype)  # [n, len(ks)]
        self.sums[:-1] += hits.sum(0).to(self.sums.device)
        self.sums[-1] += labels.numel()
        if loss_per_sample is not None:
            self.loss_sum += loss_per_sample[valid].double().sum().to(self.sums.device)

    def compute(self, accelerator=None) -> dict:
        """`{"top1": %, "top5": %, "n_images": int, "loss": mean CE, "n_corrupt": int}` over all ranks (reduce-sum
        when distributed); `n_images + n_corrupt` is the split's size."""
        both = torch.cat([self.sums, self.corrupt[None], self.loss_sum[None]])
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(both.to(accelerator.device), reduction="sum")
        both = both.cpu()
        n = int(round(both[len(self.ks)].item()))
        out = {f"top{k}": (100.0 * both[i].item() / n if n else 0.0) for i, k in enumerate(self.ks)}
        out["n_images"] = n
        out["n_corrupt"] = int(round(both[len(self.ks) + 1].item()))
        out["loss"] = both[-1].item() / n if n else None
        return out


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches, accelerator, *, total: int | None = None, progress: bool = True,
                   desc: str = "eval") -> dict:
    """`{"top1", "top5", "n_images", "loss"}` of `model` (logits from `model(images)`) over `batches`, device batches
    of the eval stream (`data.device_input.device_batches`): "image", "label", "valid"."""
    was_training = model.training
    model.eval()
    meter = AccuracyMeter(device=accelerator.device)
    show = progress and accelerator.is_main_process
    for batch in tqdm(batches, desc=desc, disable=not show, total=total, leave=False):
        with accelerator.autocast():
            logits = model(batch["image"])
        logits = logits.float()
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        meter.update(logits, labels, batch.get("valid"), loss, batch.get("corrupt"))
    model.train(was_training)
    return meter.compute(accelerator)


def write_eval_json(path: str | Path, result: dict, accelerator=None) -> None:
    if accelerator is not None and not accelerator.is_main_process:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")  # strict JSON: NaN is null
    os.replace(tmp, path)



__all__ = ["topk_correct", "AccuracyMeter", "evaluate_model", "write_eval_json"]
