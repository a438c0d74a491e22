"""The planner's arithmetic (`--plan`, launch/plan.py): from measured rates and costs to the run's bound, its live
data-wait share, its wall-clock, and the same for machines that were not measured. Pure functions of numbers.

Terms (rates in images per second of the global batch; one process unless said):
- S, the step-bound rate: the entry point's own step on synthetic batches (nothing waits for data). `host_wait` is
  the share of its window the loop still counted as waiting (the host's normalisation of the batch on CPU, ~0 with
  CUDA's side stream): the floor of the live `data_wait`.
- L, the loader-bound rate: the training loader alone with the run's workers, and `per_core` = L / the cores it used.
  During the run the workers get `cores - step threads` cores (`loader_in_run`).
- The bound: workers run beside the step, so the run goes at min(S, L); with no workers the loader runs in the
  training process, between steps, so the times add. `data_wait` is predicted in the loop's own terms: the share of
  a window's wall-clock (hooks excluded) spent in `next(batches)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOADER, STEP = "loader", "step"
LOADER_MARGIN = 0.05  # a data_wait above the step's own floor by more than this: the loader held the run back


@dataclass(frozen=True)
class Bound:
    images_per_sec: float  # the run's predicted rate
    by: str  # LOADER or STEP
    data_wait: float  # predicted share of a window spent waiting for the next batch (the loop's data_wait)
    loader_over_step: float | None  # L / S (None: no loader to time)


def count_evaluations(steps: int, eval_every: int) -> int:
    """Evaluation steps strictly before the last one (the hooks' `every`; the last step's are the run's end)."""
    return (steps - 1) // eval_every if eval_every > 0 else 0


def count_saves(steps: int, save_every: int) -> int:
    """Checkpoints the loop saves: every `save_every` steps and at the last step."""
    if save_every <= 0:
        return 1
    return steps // save_every + (1 if steps % save_every else 0)


def loader_in_run(per_core: float, workers: int, cores: int, step_threads: int) -> float:
    """The loader's rate beside the step: `per_core` on the cores the step leaves (at least one), at most one core
    per worker."""
    return per_core * min(workers, max(1, cores - step_threads))


def bound(step_rate: float, loader_rate: float | None, workers: int, host_wait: float = 0.0) -> Bound:
    """The run's rate, what bounds it, and the predicted data_wait (see the module docstring).

    Workers (>= 1): per batch of B images the main process computes for B/S (a share `host_wait` of it counted as
    wait), while the workers deliver one every B/L; if L < S the main process waits B/L - B/S(1 - host_wait), so
    data_wait = 1 - (L/S)(1 - host_wait). No workers: the loader's B/L adds to each step's B/S."""
    if loader_rate is None:
        return Bound(step_rate, STEP, host_wait, None)
    ratio = loader_rate / step_rate
    if workers == 0:
        per_image = 1 / step_rate + 1 / loader_rate
        wait = (1 / loader_rate + host_wait / step_rate) / per_image
        by = LOADER if 1 / loader_rate > (1 - host_wait) / step_rate else STEP
        return Bound(1 / per_image, by, wait, ratio)
    if loader_rate < step_rate:
        return Bound(loader_rate, LOADER, max(host_wait, 1 - ratio * (1 - host_wait)), ratio)
    return Bound(step_rate, STEP, host_wait, ratio)


def live_bound(data_wait: float, host_wait: float) -> str:
    """What bounded a run, read from its logged data_wait against the step's own floor (`host_wait`)."""
    return LOADER if data_wait - host_wait > LOADER_MARGIN else STEP


def cores_to_balance(step_rate: float, per_core: float) -> int:
    """Loader cores (one worker each) that deliver as fast as the step consumes."""
    return max(1, math.ceil(step_rate / per_core))


@dataclass(frozen=True)
class WallClock:
    start_sec: float  # process start, imports, model, loaders, first batch: before the first timed step
    steps_sec: float  # every step at the bound's rate
    warmup_sec: float  # the first steps' extra time (compilation, allocator), measured
    evaluations: int  # evaluation steps before the last
    evaluation_sec: float  # one of them
    end_hooks_sec: float  # the hooks at the last step (the k-NN monitor's final evaluation)
    saves: int
    save_sec: float  # one checkpoint
    end_sec: float  # after the loop: exports, fine-tuning's final test evaluation

    @property
    def total_sec(self) -> float:
        return (self.start_sec + self.steps_sec + self.warmup_sec + self.evaluations * self.evaluation_sec
                + self.end_hooks_sec + self.saves * self.save_sec + self.end_sec)


def steps_seconds(steps: int, global_batch: int, rate: float) -> float:
    return steps * global_batch / rate


def epochs(steps: int, global_batch: int, num_samples: int | None) -> float | None:
    return steps * global_batch / num_samples if num_samples else None


@dataclass(frozen=True)
class Target:
    """A machine that was not measured: `count` devices of one kind, each at `step_per_device` images/s."""

    name: str
    count: int
    step_per_device: float
    loader_cores: int  # loader cores per process on that machine
    per_core: float | None  # the loader's measured images/s per core (this machine's cores)


def target_time(t: Target, *, steps: int, global_batch: int, evaluation_sec: float, here_rate: float,
                price: float | None) -> dict:
    """Step- and loader-bound rates of `t`, what bounds it, hours of the steps plus the evaluations (`evaluation_sec`
    measured here at `here_rate` images/s, scaled by the rate `t` reaches: they are forward passes over images that
    go through a loader too), device-hours and their cost at `price` per device-hour (start-up not included)."""
    step_total = t.step_per_device * t.count
    loader_total = t.per_core * t.loader_cores * t.count if t.per_core else None
    b = bound(step_total, loader_total, t.loader_cores)
    evaluations = evaluation_sec * here_rate / b.images_per_sec
    hours = (steps_seconds(steps, global_batch, b.images_per_sec) + evaluations) / 3600
    return {"step_images_per_sec": step_total, "loader_images_per_sec": loader_total, "bound": b.by,
            "images_per_sec": b.images_per_sec, "hours": hours, "device_hours": hours * t.count,
            "cost": hours * t.count * price if price is not None else None}


def step_from_flops(flops_per_image: float, peak_tflops: float, mfu: float) -> float:
    """Images/s of one device running at `mfu` of its `peak_tflops` on `flops_per_image` training FLOPs."""
    return mfu * peak_tflops * 1e12 / flops_per_image


__all__ = ["Bound", "WallClock", "Target", "LOADER", "STEP", "LOADER_MARGIN", "live_bound", "count_evaluations",
           "count_saves", "loader_in_run", "bound", "cores_to_balance", "steps_seconds", "epochs", "target_time",
           "step_from_flops"]
