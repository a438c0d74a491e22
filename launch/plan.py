"""`--plan`: a run's speed, wall-clock, memory and bottleneck, predicted before it is launched.

    python pretrain/mae.py --plan                                     # the default run, planned on this machine
    python pretrain/mae.py pretrain/configs/cifar10_cpu.yaml data.train=/data/cifar10-wds --plan
    python finetune/classify.py encoder=runs/pretrain/encoder.safetensors --plan --plan-max-batch
    python pretrain/mae.py pretrain/configs/in1k_vit_base.yaml data.train=/data/in1k --plan \
        --plan-for H100x8 --plan-for A100x8 --plan-price 2.50 --plan-world 8

Every training entry point takes `--plan` after the same config files and `key=value` overrides as the run itself
(`launch/config.parse_cli` hands them here). The plan
1. times the training loader alone for a few seconds, with the run's worker count (the entry point's `plan_loader`):
   the loader-bound images/s and its rate per core;
2. runs the entry point's own `main()` in this process on synthetic batches (`data.loader=synthetic`), 5 warm-up and
   `--plan-steps` timed steps in log windows of 5 (compilation included when the run compiles), one evaluation step
   in the middle (`run.eval_every`: the k-NN monitor and pictures, or the test evaluation), the final checkpoint and
   the exports, into a temporary run directory, and reads the loop's own log records back (launch/plan_measure.py):
   the step-bound images/s, the evaluation, checkpoint, start-up and end seconds, the peak memory;
3. runs it again on its real loader for the same steps, ended there (no evaluation, checkpoint or export): the two
   together, sharing this machine's cores and memory bandwidth, which on a CPU box slows both (the figure the
   wall-clock uses, and the `data_wait` the loop will log);
4. predicts (launch/plan_predict.py, arithmetic in launch/plan_math.py): the bound (step or loader), the
   wall-clock of `run.steps` (start-up, steps, warm-up, evaluations at `run.eval_every`, checkpoints at
   `run.save_every`, the end), FLOPs and MFU, and with `--plan-for NAME[xN]` the same for machines that were not
   measured (from the alone figures);
5. prints it, every figure tagged [measured] or [predicted], and writes it as JSON (`RUN_DIR/plan.json`,
   launch/plan_report.py). Nothing of the run directory but plan.json is touched.

It runs in one process (`python ...`, not a multi-process launch); `--plan-world N` plans the config for N processes
(each gets the micro-batch `data.global_batch / (N x accumulation)`), assuming they scale perfectly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from core.errors import ConfigError, UserError
from launch import run_files
from launch.config import applicable_values, load_config
from launch.metrics import json_safe
from launch.plan_measure import (
    LoaderPlace,
    largest_micro_batch,
    memory_budget,
    process_age,
    run_entry,
    time_loader,
    window_stats,
)
from launch.plan_predict import DEFAULT_MFU, WINDOW, Measured, predict, target_spec
from launch.plan_report import render
from launch.sections import resolve_batch

DEFAULT_TIMED_STEPS = 15
DEFAULT_LOADER_SECONDS = 5.0
PROBE_BATCHES = 3  # micro-batches of a memory probe (the first includes the allocator's warm-up)
LONG_RUN = 100_000  # run.steps of the runs the plan ends early (their schedules do not end within the stretch)


def options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The `--plan*` options, and the rest of `argv` (config files and overrides) for the run itself."""
    p = argparse.ArgumentParser(prog="--plan", add_help=False, allow_abbrev=False)
    p.add_argument("--plan", action="store_true")
    p.add_argument("--plan-steps", type=int, default=DEFAULT_TIMED_STEPS,
                   help=f"timed steps (rounded up to windows of {WINDOW}; 5 warm-up steps come first)")
    p.add_argument("--plan-loader-sec", type=float, default=DEFAULT_LOADER_SECONDS,
                   help="seconds of the loader timed alone")
    p.add_argument("--plan-world", type=int, default=1, help="processes the run will have (batch arithmetic)")
    p.add_argument("--plan-max-batch", action="store_true", help="find the largest micro-batch that fits")
    p.add_argument("--plan-for", action="append", default=[], metavar="NAME[xN]",
                   help="predict N devices of NAME (H100, H200, A100, ..., or cpu: machines like this one)")
    p.add_argument("--plan-mfu", type=float, default=DEFAULT_MFU, help="model FLOP utilisation for --plan-for GPUs")
    p.add_argument("--plan-cores", type=int, default=None,
                   help="loader cores per process on the --plan-for machines (default: data.num_workers)")
    p.add_argument("--plan-price", type=float, default=None, help="price per device-hour, for the cost")
    p.add_argument("--plan-out", default=None, help=f"the JSON (default: RUN_DIR/{run_files.PLAN})")
    p.add_argument("--plan-help", action="store_true", help="these options")
    opts, rest = p.parse_known_args(argv)
    if opts.plan_help or any(a in ("-h", "--help") for a in rest):
        print(p.format_help())
        raise SystemExit(0)
    stray = [a for a in rest if a.startswith("--plan")]
    if stray:
        raise ConfigError(f"unknown planning option {stray[0]} (--plan-help lists them)")
    if opts.plan_steps < 1 or opts.plan_world < 1 or opts.plan_loader_sec <= 0 or not 0 < opts.plan_mfu <= 1:
        raise ConfigError("--plan-steps and --plan-world must be >= 1, --plan-loader-sec > 0, --plan-mfu in (0, 1]")
    return opts, rest


def plan_cli(cls: type, argv: list[str], prog: str) -> int:
    """`prog ... --plan`: print the plan and write its JSON; a user error is one line (exit code 2)."""
    from launch.errors import EXIT_USER_ERROR, report

    try:
        opts, rest = options(argv)
        plan = make_plan(cls, prog, rest, opts)
    except UserError as exc:
        report(prog, str(exc))
        return EXIT_USER_ERROR
    out = Path(opts.plan_out or Path(load_config(cls, rest).run.output_dir) / run_files.PLAN)
    write_plan(plan, out)
    print(render(plan))
    print(f"plan written to {out}")
    return 0


def write_plan(plan: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(plan), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def entry_module(prog: str):
    """The entry point's module (`pretrain/mae.py` -> pretrain.mae); it must offer `plan_loader`."""
    module = importlib.import_module(prog.removesuffix(".py").replace("/", "."))
    if not hasattr(module, "plan_loader"):
        raise ConfigError(f"--plan: {prog} is not a training entry point (pretrain/mae.py, finetune/classify.py, "
                          f"finetune/linprobe.py)")
    return module


def run_device() -> torch.device:
    """The device Accelerate will pick for one process."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def run_values(cls: type, args: list[str], overrides: list[str], micro: int) -> dict:
    """The user's values with `overrides`, less what no longer applies, the micro-batch stated outright."""
    values = applicable_values(cls, [*args, *overrides])
    data = values.setdefault("data", {})
    data.pop("global_batch", None)
    data["micro_batch"] = micro
    return values


def run_with(module, cls, args: list[str], overrides: list[str], micro: int, folder: Path, device: torch.device,
             limit: int | None = None):
    """The entry point's main on the user's config plus `overrides`, in `folder` (launch/plan_measure.run_entry)."""
    folder.mkdir(parents=True)
    config = folder / "plan_run.yaml"
    config.write_text(yaml.safe_dump(run_values(cls, args, [f"run.output_dir={folder / 'run'}", *overrides], micro)))
    return run_entry(module, [str(config)], folder / "run", folder / "output.log", device, limit=limit)


def measure(module, cls, cfg, args: list[str], opts, *, micro: int, world: int, device: torch.device,
            notes: list[str]) -> Measured:
    """The loader alone, the entry point on synthetic batches, then with its real loader, and the micro-batch search;
    each in its own temporary run directory, in this order, one at a time."""
    age, accum = process_age(), cfg.optim.grad_accum_steps
    loader = module.plan_loader(cfg, LoaderPlace(micro, 0, world, device))
    loader_stats = None
    if loader is not None:
        loader_stats = time_loader(loader, seconds=opts.plan_loader_sec,
                                   workers=int(getattr(loader, "num_workers", 0)))
        del loader
    timed = -(-opts.plan_steps // WINDOW) * WINDOW
    cadence = ["run.resume=false", "run.trackers=none", "run.progress=false", "run.save_every=0"]
    synthetic = ["data.loader=synthetic"] if loader_stats is not None else []
    tmp = Path(tempfile.mkdtemp(prefix="tessera-plan-"))
    try:
        step = run_with(module, cls, args, [*cadence, *synthetic, f"run.steps={WINDOW + timed}",
                                            f"run.log_every={WINDOW}", f"run.eval_every={timed}"], micro,
                        tmp / "step", device)
        windows = window_stats(step.records, global_batch=micro * accum)
        together = None
        if loader_stats is not None:  # the same steps fed by the real loader, ended before anything else runs
            run = run_with(module, cls, args, [*cadence, f"run.steps={LONG_RUN}", f"run.log_every={WINDOW}",
                                               "run.eval_every=0"], micro, tmp / "together", device,
                           limit=(WINDOW + timed) * accum + 1)
            together = window_stats(run.records, global_batch=micro * accum)
        search = None
        if opts.plan_max_batch:
            if cfg.__class__.__name__ == "LinprobeConfig" and getattr(cfg.probe, "cached", False):
                notes.append("--plan-max-batch: the cached probe trains a linear head on features; its memory "
                             "hardly depends on the micro-batch (not searched)")
            else:
                search = batch_search(module, cls, args, [*cadence, *synthetic], micro, accum, tmp, device)
    except BaseException:
        print(f"the planning runs' output is kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return Measured(step, windows, loader_stats, together, search, age)


def make_plan(cls: type, prog: str, args: list[str], opts: argparse.Namespace) -> dict:
    """Measure and predict (see the module docstring); the plan as a dict (launch/plan_report.py)."""
    t_plan = time.perf_counter()
    cfg = load_config(cls, args)
    module = entry_module(prog)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--plan runs in one process: start it with python, not a multi-process launch "
                          "(--plan-world N plans N processes)")
    for spec in opts.plan_for:  # refused before anything is timed
        target_spec(spec)
    device, world, accum = run_device(), opts.plan_world, cfg.optim.grad_accum_steps
    micro, global_batch = resolve_batch(cfg.data.micro_batch, cfg.data.global_batch, world, accum)
    notes: list[str] = []
    m = measure(module, cls, cfg, args, opts, micro=micro, world=world, device=device, notes=notes)
    plan = predict(cfg, m, opts, prog=prog, args=args, device=device, micro=micro, world=world,
                   global_batch=global_batch, notes=notes)
    plan["measured"]["plan_sec"] = time.perf_counter() - t_plan
    return plan


def batch_search(module, cls, args, cadence, micro, accum, tmp: Path, device: torch.device):
    """The largest micro-batch that fits (launch/plan_measure.largest_micro_batch), by probes of a few steps."""
    import gc

    def probe(m: int) -> int | None:
        try:
            er = run_with(module, cls, args, [*cadence, f"run.steps={LONG_RUN}", "run.log_every=1",
                                              "run.eval_every=0"], m,
                          tmp / f"probe-{m}", device, limit=PROBE_BATCHES * accum)
            return er.peak_bytes
        except torch.OutOfMemoryError:
            return None
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return largest_micro_batch(probe, start=micro, budget=memory_budget(device), device_type=device.type)


__all__ = ["plan_cli", "make_plan", "options"]
