"""The plan from its measurements (`--plan`, launch/plan.py): this machine's bound, data_wait and wall-clock,
memory, FLOPs and MFU, the notes a reader needs, and `--plan-for` machines that were not measured. The arithmetic is
launch/plan_math.py's; the JSON's shape launch/plan_report.py's.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError
from launch import plan_math as pm
from launch import run_files
from launch.hardware import PEAK_TFLOPS, device_name, peak_tflops, precision_name
from launch.plan_measure import (
    BatchSearch,
    EntryRun,
    LoaderStats,
    WindowStats,
    fits,
    machine,
    matmul_tflops,
    memory_budget,
)
from launch.plan_report import FORMAT
from launch.sections import resolve_batch
from models.compile import compile_enabled

WINDOW = 5  # steps per log window of the planning runs; the first window is the warm-up
DEFAULT_MFU = 0.30
MFU_WHY = ("assumed, --plan-mfu: published MAE pretraining ran at 29-30% (MAE paper, TPU v3) and at most 37% "
           "(DailyMAE, A100)")
SMALL_MODEL_FLOPS = 5e9  # training FLOPs per image below which a large GPU is not FLOP-bound
TARGET_RE = re.compile(r"^(?P<name>.+?)(?:[x:](?P<count>\d+))?$")


def start_step(run) -> int:
    """The step the run would resume at (its newest complete checkpoint), else 0."""
    from launch.checkpoint import complete_checkpoints

    done = complete_checkpoints(Path(run.output_dir) / run_files.CHECKPOINTS) if run.resume else []
    return min(done[-1][0], run.steps) if done else 0


@dataclass
class Measured:
    """What the plan timed (see the module docstring)."""

    step: EntryRun  # the entry point on synthetic batches (or its own cached features)
    windows: WindowStats  # its log windows
    loader: LoaderStats | None  # the loader alone (None: nothing to time)
    together: WindowStats | None  # the entry point with its real loader: step and loader sharing the machine
    search: BatchSearch | None  # --plan-max-batch
    age: float  # seconds from the process's start to the plan's (interpreter, imports)


def predict(cfg, m: Measured, opts, *, prog: str, args: list[str], device: torch.device, micro: int, world: int,
            global_batch: int, notes: list[str]) -> dict:
    """The plan (launch/plan_report.py) from the measurements."""
    accum, run, ws, er = cfg.optim.grad_accum_steps, cfg.run, m.windows, m.step
    local_batch = micro * accum  # images per optimizer step of one process
    cores = len(os.sched_getaffinity(0))
    step_threads = torch.get_num_threads() if device.type == "cpu" else 1
    timed = ws.timed_steps
    last = WINDOW + timed
    save_sec = er.save_sec[-1] if er.save_sec else 0.0
    loop_sec = ws.loop_sec + sum(ws.hook_sec.values()) + sum(er.save_sec)
    start_sec = m.age + er.first_batch_at
    end_sec = max(0.0, er.wall_sec - er.first_batch_at - loop_sec)

    step_rate, host_wait = ws.images_per_sec, min(ws.host_wait, 1.0)
    loader_part, loader_in_run, workers = None, None, 0
    if m.loader is not None:
        workers = m.loader.workers
        used = min(workers, cores) if workers else 1
        per_core = m.loader.images_per_sec / used
        loader_in_run = (pm.loader_in_run(per_core, workers, cores, step_threads) if workers
                         else m.loader.images_per_sec)
        loader_part = {"images_per_sec": m.loader.images_per_sec, "per_core_images_per_sec": per_core,
                       "workers": workers, "cores": used, "first_batch_sec": m.loader.first_batch_sec,
                       "batches": m.loader.batches}
        start_sec += m.loader.first_batch_sec
        if device.type == "cpu" and workers and step_threads + workers > cores:
            notes.append(f"the step's {step_threads} thread(s) and {workers} loader worker(s) share {cores} cores: "
                         f"the loader is predicted on the {max(1, cores - step_threads)} core(s) the step leaves")
    alone = pm.bound(step_rate, loader_in_run, workers, host_wait)
    rate, data_wait, by, basis = alone.images_per_sec, alone.data_wait, alone.by, "step and loader alone"
    together = None
    if m.together is not None:
        t = m.together
        together = {"images_per_sec": t.images_per_sec, "data_wait": t.host_wait, "timed_steps": t.timed_steps,
                    "windows": t.windows}
        rate, data_wait, basis = t.images_per_sec, t.host_wait, "the run's steps with its loader, measured"
        by = pm.live_bound(t.host_wait, host_wait)
        if by != alone.by:
            notes.append(f"alone, the {alone.by} is the slower side; together (sharing this machine's cores and "
                         f"memory) the run waited like a {by}-bound run: the plan follows the run")
    balance = (pm.cores_to_balance(step_rate, loader_part["per_core_images_per_sec"])
               if loader_part and workers else None)

    begin = start_step(run)
    evaluations = pm.count_evaluations(run.steps, run.eval_every) - (begin // run.eval_every if run.eval_every
                                                                        else 0)
    saves = pm.count_saves(run.steps, run.save_every) - (begin // run.save_every if run.save_every else 0)
    wall = pm.WallClock(start_sec=start_sec, steps_sec=pm.steps_seconds(run.steps - begin, local_batch, rate),
                        warmup_sec=ws.warmup_extra_sec, evaluations=evaluations,
                        evaluation_sec=ws.hook_sec.get(timed, 0.0), end_hooks_sec=ws.hook_sec.get(last, 0.0),
                        saves=saves, save_sec=save_sec, end_sec=end_sec)

    precision = precision_name(str(er.record.get("precision", "no")))
    flops = er.record.get("flops_per_image")
    here = device_name(device)
    peak, peak_source = peak_tflops(here, precision), "the vendor's dense peak"
    if peak is None and device.type == "cpu" and flops:
        peak = matmul_tflops(torch.bfloat16 if precision == "bf16" else torch.float32)
        peak_source = "a 1024^3 matmul measured on this CPU"
    tflops = step_rate * flops / 1e12 if flops else None
    mfu = tflops / peak if tflops and peak else None
    num_samples = dataset_size(cfg)
    budget = memory_budget(device)
    notes += situation_notes(cfg, flops=flops, world=world, cores=cores, begin=begin)

    targets = []
    for spec in opts.plan_for:
        target = predict_target(spec, cfg, opts, flops=flops, here_rate=rate, here_by=by, mfu_here=mfu,
                                here=here, loader_part=loader_part, workers=workers,
                                eval_sec=evaluations * wall.evaluation_sec + wall.end_hooks_sec, notes=notes)
        if target is not None:
            targets.append(target)

    measured = {
        "step": {"images_per_sec": step_rate, "step_sec": ws.step_sec, "warmup_extra_sec": ws.warmup_extra_sec,
                 "host_wait": host_wait, "timed_steps": ws.timed_steps, "windows": ws.windows, "tflops": tflops,
                 "mfu": mfu, "peak_tflops": peak, "peak_source": peak_source if peak else None},
        "loader": loader_part,
        "together": together,
        "evaluation": {"mid_sec": wall.evaluation_sec, "end_hooks_sec": wall.end_hooks_sec},
        "checkpoint_sec": save_sec, "start_sec": start_sec, "end_sec": end_sec,
        "memory": {"kind": er.peak_kind, "peak_bytes": er.peak_bytes, "budget_bytes": budget,
                   "fits": fits(er.peak_bytes, budget) if er.peak_bytes is not None else None},
    }
    predicted = {
        "loader_in_run_images_per_sec": loader_in_run,
        "bound": {"by": by, "images_per_sec": rate, "data_wait": data_wait, "basis": basis,
                  "alone_by": alone.by, "alone_images_per_sec": alone.images_per_sec,
                  "loader_over_step": alone.loader_over_step, "cores_to_balance": balance},
        "wall_clock": {**{k: getattr(wall, k) for k in ("start_sec", "steps_sec", "warmup_sec", "evaluations",
                                                        "evaluation_sec", "end_hooks_sec", "saves", "save_sec",
                                                        "end_sec")}, "total_sec": wall.total_sec},
        "run_tflop": flops * run.steps * global_batch / 1e12 if flops else None,
        "targets": targets,
    }
    if m.search is not None:
        section = measured if m.search.method == "search" else predicted
        section["max_micro_batch"] = {"micro_batch": m.search.micro_batch, "method": m.search.method,
                                      "probes": [list(p) for p in m.search.probes]}
    return {
        "format": FORMAT, "entry": prog, "args": list(args), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
        "machine": machine(),
        "run": {"device": device.type, "precision": precision, "compile": compile_enabled(run.compile, device),
                "world_size": world, "micro_batch": micro, "global_batch": global_batch, "grad_accum_steps": accum,
                "steps": run.steps, "start_step": begin, "num_samples": num_samples,
                "epochs": pm.epochs(run.steps, global_batch, num_samples),
                "loader": loader_kind(cfg), "num_workers": cfg.data.num_workers, "eval_every": run.eval_every,
                "evaluations": evaluations, "save_every": run.save_every, "saves": saves, "flops_per_image": flops},
        "measured": measured, "predicted": predicted, "notes": notes,
    }


def situation_notes(cfg, *, flops, world: int, cores: int, begin: int) -> list[str]:
    """What the reader of the plan should know about the figures' circumstances."""
    notes = []
    if not flops:
        notes.append("the FLOPs per image of this run are not counted (probe head, CNN or hybrid stem): no MFU and "
                     "no FLOP-based prediction for other GPUs")
    if world > 1:
        notes.append(f"figures per process; {world} processes like this one are assumed to scale perfectly "
                     f"(the gradient all-reduce is not measured)")
    if cfg.__class__.__name__ == "LinprobeConfig" and getattr(cfg.probe, "cached", False):
        notes.append("the probe trains on cached features: their extraction (both splits) is in the start-up; a run "
                     "directory that already holds the cache starts faster")
    if os.getloadavg()[0] > cores:
        notes.append(f"the machine was busy while the plan timed it (load {os.getloadavg()[0]:.1f} on {cores} "
                     f"cores): re-plan on a quiet machine for figures to rely on")
    if begin:
        notes.append(f"{cfg.run.output_dir} holds a checkpoint at step {begin}: the run resumes there")
    return notes


def loader_kind(cfg) -> str:
    if getattr(getattr(cfg, "probe", None), "cached", False):
        return "cached features"
    return getattr(cfg.data, "loader", "stream")


def dataset_size(cfg) -> int | None:
    from data.info import DatasetError, resolve

    try:
        return resolve(cfg.data.train).num_samples
    except DatasetError:
        return None


def target_spec(spec: str) -> tuple[str, int]:
    """`H100x8` / `H100:8` / `A100` / `cpu` -> (name, count); a name without a known peak is refused."""
    m = TARGET_RE.match(spec.strip())
    name, count = m.group("name"), int(m.group("count") or 1)
    if count < 1:
        raise ConfigError(f"--plan-for {spec}: the count must be >= 1")
    if name.lower() != "cpu" and all(peak_tflops(name, p) is None for p in ("bf16", "fp16", "fp32")):
        known = ", ".join(k for k, _ in PEAK_TFLOPS)
        raise ConfigError(f"--plan-for {spec}: no peak TFLOP/s known for {name} (known: {known}, and cpu for "
                          f"machines like this one; launch/hardware.py holds the table)")
    return name, count


def predict_target(spec: str, cfg, opts, *, flops, here_rate: float, here_by: str, mfu_here, here: str,
                   loader_part, workers: int, eval_sec: float, notes: list[str]) -> dict | None:
    """One `--plan-for NAME[xN]`: step-bound rate from FLOPs at a stated utilisation (GPUs) or as measured here
    (`cpu`), the loader from the measured per-core rate, hours, device-hours and cost."""
    name, count = target_spec(spec)
    micro, global_batch = resolve_batch(cfg.data.micro_batch, cfg.data.global_batch, count,
                                        cfg.optim.grad_accum_steps)
    if name.lower() == "cpu":  # machines like this one: its predicted rate, loader included, per machine
        t = pm.Target(name, count, here_rate, 0, None)
        times = {**pm.target_time(t, steps=cfg.run.steps, global_batch=global_batch, evaluation_sec=eval_sec,
                                  here_rate=here_rate, price=opts.plan_price), "bound": here_by}
        return target_row(t, "fp32", None, None, "this machine's rate, loader included", micro, global_batch, times,
                          opts.plan_price)
    precision = precision_name("bf16" if cfg.run.precision == "auto" else cfg.run.precision)  # auto: bf16 on GPUs
    peak = peak_tflops(name, precision)
    if peak is None:
        raise ConfigError(f"--plan-for {spec}: no {precision} peak TFLOP/s known for {name}")
    if not flops:
        notes.append(f"--plan-for {spec}: skipped (no FLOP count for this run)")
        return None
    if mfu_here is not None and peak_tflops(here, precision) == peak and name.lower() in here.lower():
        mfu, source = mfu_here, "measured by this plan on this GPU"
    else:
        mfu, source = opts.plan_mfu, MFU_WHY
    per_device = pm.step_from_flops(flops, peak, mfu)
    loader_cores = opts.plan_cores or max(workers, 1)
    if flops < SMALL_MODEL_FLOPS and not any("small model" in n for n in notes):
        notes.append(f"a small model ({flops / 1e9:.2f} GFLOP per training image) rarely reaches the stated MFU "
                     f"on a large GPU (kernel launches, not FLOPs, limit it): read its GPU figures as upper bounds")
    per_core = loader_part["per_core_images_per_sec"] if loader_part else None
    t = pm.Target(name, count, per_device, loader_cores if per_core else 0, per_core)
    times = pm.target_time(t, steps=cfg.run.steps, global_batch=global_batch, evaluation_sec=eval_sec,
                           here_rate=here_rate, price=opts.plan_price)
    return target_row(t, precision, peak, mfu, source, micro, global_batch, times, opts.plan_price)


def target_row(t: pm.Target, precision: str, peak, mfu, source: str, micro: int, global_batch: int, times: dict,
               price) -> dict:
    return {"name": t.name, "count": t.count, "precision": precision, "peak_tflops": peak, "mfu": mfu,
            "mfu_source": source, "micro_batch": micro, "global_batch": global_batch,
            "step_images_per_sec": times["step_images_per_sec"],
            "loader_images_per_sec": times["loader_images_per_sec"],
            "loader_cores": t.loader_cores, "bound": times["bound"], "images_per_sec": times["images_per_sec"],
            "hours": times["hours"], "device_hours": times["device_hours"], "price_per_hour": price,
            "cost": times["cost"]}


__all__ = ["Measured", "predict", "target_spec", "start_step", "WINDOW", "DEFAULT_MFU", "MFU_WHY"]
