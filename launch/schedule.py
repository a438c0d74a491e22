"""Learning-rate schedule as a pure function of the optimizer step: linear warmup, then half-cycle cosine to min_lr.

The lr is set by hand every optimizer step (`apply_lr`) instead of passing a scheduler through
`accelerator.prepare`, because a prepared scheduler steps `num_processes` times per step under DDP and once under
DeepSpeed. Being a function of the step, the schedule needs no state in a checkpoint.
Step convention (as in the official MAE code): the update with 0-based index `step` uses `lr_at(step)`, so the very
first update of a warmup has lr 0 and the peak is reached at `step == warmup_steps`.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the optimizer step with 0-based index `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr to `lr * group["lr_scale"]` (layer-wise decay; 1.0 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = ["lr_at", "apply_lr"]
