"""The one training loop that pretraining, fine-tuning and probing all run.

An entry point builds the pieces (prepared model and optimizer, an iterator of device batches, a `step_fn(batch) ->
loss`) and the run's `Session` (`launch/session.py`), and calls `TrainLoop(...).fit()`. The loop owns what every
run shares: the lr from the step, gradient accumulation without gradient sync on the inner micro-steps, one autocast
policy (Accelerate's, around the whole step function), clipping, the non-finite policy, log / stop / save cadence
(checkpoints through the session), the progress bar and periodic hooks (evaluation, pictures).

Each logged record has, besides the loss and lr: `images_per_sec` (hooks excluded), `data_wait` (the share of the
window's wall-clock, hooks excluded, the host spent waiting for the next batch, the slowest rank's: near 1 means
input-bound; the progress bar shows it as `wait`, and `--plan` predicts it: launch/plan.py), `hook_sec` (host seconds
in the hooks since the previous record: evaluations, pictures; all due hooks run before the step's record),
`tflops` (achieved model TFLOP/s per device from the FLOPs per image) and `mfu` (that over the device's peak, when
the peak is known: `launch/hardware.py`). A stop signal that arrives while the run still waits for its first batch
ends it at once (nothing to save yet).

Host syncs: none outside log and save steps. The loss window, the non-finite counters and the skip decision stay on
the device (`launch/nonfinite.py`); the stop flag is agreed over a CPU gloo group (`launch/signals.py`). DeepSpeed is
the exception: its engine steps inside `backward`, so the skip must be decided on the host before the last backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from core.errors import RunError
from launch.hardware import device_name, peak_tflops, precision_name
from launch.nonfinite import NonFiniteGuard, nonfinite
from launch.sample_log import SampleLog
from launch.schedule import apply_lr, lr_at
from launch.session import Session
from launch.signals import StopFlag, StopRequested


class NonFiniteLossError(RunError):
    """Too many consecutive non-finite losses."""


@dataclass
class Hook:
    """`fn(step) -> metrics or None`, called every `every` steps (0: never) and, with `at_end`, after the last step."""

    every: int
    fn: Callable[[int], dict | None]
    at_end: bool = False
    # merge: run before the step's log and put the values into its record (and on the progress bar); the hook's
    # time is left out of images_per_sec. Otherwise the values are a record of their own, after the log.
    merge: bool = False

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (self.at_end and last)


@dataclass
class LoopResult:
    step: int
    loss: float | None  # the last logged window-mean loss
    stopped_by: str | None  # the stop signal's name, or None when the run finished
    checkpoint: object | None  # what the last `save` returned (its path)


@dataclass
class TrainLoop:
    session: Session  # the run: accelerator, config (run, optim), batch arithmetic, checkpoints, metrics
    model: torch.nn.Module  # prepared; its parameters that require grad are the ones clipped
    optimizer: torch.optim.Optimizer  # prepared
    step_fn: Callable[[dict], torch.Tensor]  # one micro-batch -> scalar loss (called under autocast)
    batches: Iterator[dict]  # micro-batches already on the device
    peak_lr: float
    hooks: Sequence[Hook] = ()
    log_extra: Callable[[int], dict] | None = None  # step -> more metrics (may sync: runs at log steps only)
    after_update: Callable[[int], None] | None = None  # e.g. an EMA update, after every optimizer step
    desc: str = "train"
    flops_per_image: float | None = None  # training FLOPs per image (forward + backward): tflops and mfu
    # shown beside the merged hook values on the progress bar and log lines, never logged (e.g. the k-NN baselines,
    # logged once by the entry point)
    show: dict | None = None

    def fit(self) -> LoopResult:
        """Train from the session's start step to `run.steps` (or a stop signal); see the module docstring."""
        acc, run, optim = self.session.rt.accelerator, self.session.cfg.run, self.session.cfg.optim
        state, start_step = self.session.loop_state, self.session.start_step
        self.global_batch = self.session.rt.global_batch
        self._shown = {}  # merged hook values on the progress bar (the latest of each), e.g. knn_top1
        self._peak = peak_tflops(device_name(acc.device), precision_name(acc.mixed_precision))
        device, accum = acc.device, self.session.rt.accum  # a resume on another world size may change it
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        params = [p for p in self.model.parameters() if p.requires_grad]
        guard = None if deepspeed else NonFiniteGuard(self.optimizer, acc.scaler, self.model)
        stop = self.session.stop or StopFlag(acc.num_processes)  # the session's, installed when the run began
        # counters live on the device and are read at log and save steps only
        nf_total = torch.tensor(float(state.get("nonfinite_total", 0)), device=device)
        nf_run = torch.tensor(float(state.get("nonfinite_consecutive", 0)), device=device)
        nf_worst = nf_run.clone()  # the longest streak since the last log step
        window = torch.zeros(2, device=device)  # [sum of the kept steps' losses, number of kept steps]
        step, stopped_by, loss, ckpt = start_step, None, None, None
        # the newest checkpoint saved outside a non-finite streak (what the advice names when a streak stops the run)
        good_ckpt = state.get("last_good_checkpoint") if state.get("nonfinite_consecutive") else state.get("path")
        clock = (time.perf_counter(), step)
        self._wait = 0.0  # host seconds spent in next(batches) since the last log step
        data = getattr(self.session.cfg, "data", None)  # the entry point's data section (data.log_samples)
        samples = SampleLog(acc, self.session.run_dir, step) if getattr(data, "log_samples", False) else None
        self._hook_sec = 0.0  # host seconds spent in hooks since the last log step
        bar = tqdm(total=run.steps, initial=step, desc=self.desc, dynamic_ncols=True,
                   disable=not (run.progress and acc.is_main_process))
        self.model.train()
        # Accelerate counts micro-steps (`accelerator.step`) to decide which one of `accumulate` syncs gradients and
        # steps the optimizer; `load_state` restores the saved run's count from random_states_0.pkl. Resumed with
        # another accumulation (another number of processes), that count would sync the wrong micro-step and skip
        # the optimizer step. Every fit starts at an optimizer-step boundary, so the count starts at 0.
        acc.step = 0
        first = None
        if step < run.steps:
            stop.waiting = True  # a stop signal before the first batch arrives ends the run at once
            try:
                first = self._next_batch()
            except StopRequested as req:
                bar.close()
                return LoopResult(step=step, loss=None, stopped_by=str(req), checkpoint=None)
        stop.waiting = False
        while step < run.steps and stopped_by is None:
            lr = lr_at(step, peak_lr=self.peak_lr, warmup_steps=optim.warmup_steps, total_steps=run.steps,
                       min_lr=optim.min_lr)
            apply_lr(self.optimizer, lr)
            loss_sum, skip_ds = torch.zeros((), device=device), False
            if guard is not None:
                guard.begin()
            for micro in range(accum):
                batch, first = (first, None) if first is not None else (self._next_batch(), None)
                if samples is not None:
                    samples.add(batch)
                with acc.accumulate(self.model):  # no gradient all-reduce until the last micro-step
                    with acc.autocast():
                        micro_loss = self.step_fn(batch)
                    loss_sum += micro_loss.detach().float()
                    if deepspeed and micro == accum - 1:  # the engine steps inside this backward: decide now
                        skip_ds = bool(acc.reduce(nonfinite(loss_sum).float(), reduction="sum").item() > 0)
                    if not skip_ds:
                        acc.backward(micro_loss)  # Accelerate divides by the accumulation steps
            step_loss = loss_sum / accum
            if deepspeed:  # clipping is DeepSpeed's (`gradient_clipping` in its config)
                bad = torch.tensor(skip_ds, device=device)
            else:
                if optim.clip_grad:
                    gnorm = acc.clip_grad_norm_(params, optim.clip_grad)
                else:  # the norm alone, to catch non-finite gradients behind a finite loss
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if isinstance(gnorm, DTensor):  # FSDP2: sharded gradients give a partial norm
                    gnorm = gnorm.full_tensor()
                bad = nonfinite(step_loss, gnorm)
                if acc.num_processes > 1:  # one decision for all ranks (gradients agree, losses may not)
                    bad = acc.reduce(bad.float(), reduction="sum") > 0
                guard.step(bad)
            self.optimizer.zero_grad(set_to_none=True)
            nf_total += bad
            nf_run = (nf_run + 1) * bad
            nf_worst = torch.maximum(nf_worst, nf_run)
            window += torch.stack([torch.where(bad, 0.0, step_loss), (~bad).float()])
            step += 1
            bar.update(1)
            if samples is not None:
                samples.end_step(step)
            if self.after_update is not None:
                self.after_update(step)

            last = step == run.steps
            merged, own = {}, []
            due = [hook for hook in self.hooks if hook.due(step, last)]
            if due:  # all before the log: their time is left out of the window's clock
                t_hooks = time.perf_counter()
                for hook in due:
                    values = hook.fn(step) or {}
                    if hook.merge:
                        merged.update(values)
                    elif values:
                        own.append(values)
                hook_time = time.perf_counter() - t_hooks
                self._hook_sec += hook_time
                clock = (clock[0] + hook_time, clock[1])  # hook time is not training throughput
            if step % run.log_every == 0 or last:  # the host reads the device counters here, and only here
                loss, worst = self._log(step, lr, window, nf_total, nf_worst, clock, bar, merged)
                if worst >= run.max_nonfinite:
                    resume = (f"then resume from {good_ckpt}, the last checkpoint saved before the streak (move the "
                              f"newer ones aside)" if good_ckpt else "then start over: no checkpoint was saved before "
                              "the streak")
                    raise NonFiniteLossError(
                        f"{worst:.0f} consecutive non-finite losses (by step {step}); their updates were skipped. "
                        f"Try a lower learning rate (optim.blr or optim.lr), run.precision=bf16 instead of fp16, or "
                        f"gradient clipping (optim.clip_grad=1.0); {resume}")
                window.zero_()
                nf_worst = nf_run.clone()
                clock = (time.perf_counter(), step)
                self._wait, self._hook_sec = 0.0, 0.0
            elif merged:
                self.session.log(step, merged)
            for values in own:  # the other hooks' records, after the step's
                self.session.log(step, values)
            stopped_by = stop.poll()
            if stopped_by or last or (run.save_every and step % run.save_every == 0):
                counts = torch.stack([nf_total, nf_run]).tolist()
                ckpt = self.session.save(step, {"nonfinite_total": int(counts[0]),
                                                "nonfinite_consecutive": int(counts[1]),
                                                "last_good_checkpoint": good_ckpt})
                good_ckpt = good_ckpt if counts[1] else str(ckpt)
        bar.close()
        stop.restore()
        return LoopResult(step=step, loss=loss, stopped_by=stopped_by, checkpoint=ckpt)

    def _next_batch(self) -> dict:
        """The next micro-batch; the host time spent waiting for it counts as data wait."""
        t0 = time.perf_counter()
        batch = next(self.batches)
        self._wait += time.perf_counter() - t0
        return batch

    def _log(self, step, lr, window, nf_total, nf_worst, clock, bar, merged=None) -> tuple[float | None, float]:
        acc = self.session.rt.accelerator
        elapsed = max(time.perf_counter() - clock[0], 1e-9)
        wait = torch.tensor([self._wait / elapsed], device=acc.device)
        if acc.num_processes > 1:
            window = acc.reduce(window, reduction="sum")
            wait = acc.gather(wait).max()[None]  # the slowest rank's share
        loss_sum, kept, n_bad, worst, data_wait = torch.cat([window, nf_total[None], nf_worst[None],
                                                             wait.float()]).tolist()
        loss = loss_sum / kept if kept else None  # None (JSON null) when every step of the window was skipped
        images_per_sec = (step - clock[1]) * self.global_batch / elapsed
        values = {"loss": loss, "lr": lr, "images_per_sec": images_per_sec, "n_nonfinite": int(n_bad),
                  "data_wait": min(1.0, data_wait), "hook_sec": self._hook_sec}
        if self.flops_per_image:
            tflops = images_per_sec * self.flops_per_image / 1e12 / acc.num_processes  # per device
            values["tflops"] = tflops
            if self._peak:
                values["mfu"] = tflops / self._peak
        if self.log_extra is not None:
            values.update(self.log_extra(step))
        values.update(merged or {})
        self.session.log(step, values)
        shown = "nan" if loss is None else f"{loss:.4f}"
        shown_too = {k: v for k, v in (self.show or {}).items() if isinstance(v, float)} if merged else {}
        self._shown.update({k: f"{v:.4f}" for k, v in {**(merged or {}), **shown_too}.items() if isinstance(v, float)})
        bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{values['images_per_sec']:.0f}",
                        wait=f"{values['data_wait']:.2f}", **self._shown)
        run = self.session.cfg.run
        if acc.is_main_process and not run.progress:  # plain lines for log files and pipes
            more = "".join(f" {k} {v:.4f}" for k, v in {**(merged or {}), **shown_too}.items() if isinstance(v, float))
            print(f"step {step}/{run.steps} loss {shown} lr {lr:.3e} images/s {images_per_sec:.1f} data_wait "
                  f"{values['data_wait']:.2f}{more}", flush=True)
        return loss, worst


__all__ = ["TrainLoop", "Hook", "LoopResult", "NonFiniteLossError"]
