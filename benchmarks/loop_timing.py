"""Time a model's training step the way the entry points run it: through the shared loop (`launch/loop.py`).

`time_loop` builds a `TrainLoop` (Accelerate's autocast and backward, the entry points' fused AdamW, lr schedule,
non-finite guard) around a `step_fn(batch) -> loss` and synthetic device batches, and times it in windows of
`window` steps: a hook synchronises the device and reads the clock every `window` steps, so the host may run ahead
inside a window as in training. The first `warmup` steps are untimed (compilation, allocator and library handles).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.common import sync
from launch.loop import Hook, TrainLoop
from launch.sections import OptimConfig, RunConfig


class NullMetrics:
    """The loop's metrics sink, discarding everything (the benchmark keeps its own clock)."""

    def log(self, step: int, values: dict) -> None:
        pass


def synthetic_batches(shape: tuple, device: torch.device, *, sets: int = 2, seed: int = 0,
                      num_classes: int = 0) -> Iterator[dict]:
    """Endless batches cycling over `sets` standard-normal images (normalised-image statistics, never zeros) already
    on `device`, with random labels when num_classes > 0."""
    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(sets):
        batch = {"image": torch.randn(shape, generator=g).to(device)}
        if num_classes:
            batch["label"] = torch.randint(0, num_classes, (shape[0],), generator=g).to(device)
        made.append(batch)
    i = 0
    while True:
        yield made[i % sets]
        i += 1


def set_sdpa(model: torch.nn.Module, enable: bool) -> int:
    """Switch timm attention between F.scaled_dot_product_attention and math mode; returns modules switched."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = enable
            n += 1
    return n


def time_loop(accelerator, model, optimizer, step_fn: Callable[[dict], torch.Tensor], batches: Iterator[dict], *,
              steps: int, warmup: int, window: int, global_batch: int, grad_accum: int = 1) -> dict:
    """Run `warmup + steps` optimizer steps of the shared loop; per-step ms from the timed windows (median, min,
    max), the wall time of the warm-up (compilation included) and the last loss."""
    if steps % window:
        raise ValueError(f"steps ({steps}) must be a multiple of window ({window})")
    marks: list[float] = []
    device = accelerator.device

    def mark(step: int) -> None:  # called after every step; reads the clock at warm-up end and window ends
        if step >= warmup and (step - warmup) % window == 0:
            sync(device)
            marks.append(time.perf_counter())

    losses: list[torch.Tensor] = []

    def timed_step(batch: dict) -> torch.Tensor:
        loss = step_fn(batch)
        if len(losses) < 1:
            losses.append(loss.detach())
        else:
            losses[0] = loss.detach()
        return loss

    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        run = RunConfig(output_dir=tmp, steps=total, log_every=total, save_every=0, progress=False,
                        trackers=("none",))
        optim = OptimConfig(warmup_steps=0, grad_accum_steps=grad_accum)
        loop = TrainLoop(accelerator=accelerator, model=model, optimizer=optimizer, step_fn=timed_step,
                         batches=batches, run=run, optim=optim, peak_lr=1e-4, global_batch=global_batch,
                         metrics=NullMetrics(), save=lambda step, state: None,
                         hooks=[Hook(1, mark)])
        sync(device)
        t0 = time.perf_counter()
        loop.fit(0)
    per_step = [(b - a) * 1e3 / window for a, b in zip(marks, marks[1:])]
    if not per_step:
        raise RuntimeError("no timed window: raise steps or lower window")
    return {"step_ms_median": statistics.median(per_step), "step_ms_min": min(per_step),
            "step_ms_max": max(per_step), "step_ms_windows": [round(t, 3) for t in per_step], "window": window,
            "warmup_s": marks[0] - t0, "loss_last": float(losses[0]) if losses else None}


__all__ = ["NullMetrics", "set_sdpa", "synthetic_batches", "time_loop"]
