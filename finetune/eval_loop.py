"""One evaluation pass of a classifier over a split (every image exactly once across ranks) and the eval.json file.

`evaluate_model` counts only samples with `valid=True` (the eval loader's padding is dropped) and sums hits across
ranks, so `n_images` equals the split size for any number of processes. `write_eval_json` writes the result on the
main process, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from finetune.topk import AccuracyMeter


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, accelerator, *, progress: bool = True, desc: str = "eval",
                   input_dtype: torch.dtype = torch.float32) -> dict:
    """`{"top1", "top5", "n_images", "loss"}` of `model` (logits from `model(images)`) over `loader`."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    meter = AccuracyMeter(device=device)
    show = progress and accelerator.is_main_process
    for batch in tqdm(loader, desc=desc, disable=not show, total=len(loader), leave=False):
        images = batch["image"].to(device, dtype=input_dtype, non_blocking=True)
        labels = batch["label"].to(device)
        valid = batch["valid"].to(device) if "valid" in batch else None
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        meter.update(logits, labels, valid, loss)
    model.train(was_training)
    return meter.compute(accelerator)


def write_eval_json(path: str | Path, result: dict, accelerator=None) -> None:
    if accelerator is not None and not accelerator.is_main_process:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


__all__ = ["evaluate_model", "write_eval_json"]
