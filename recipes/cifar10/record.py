"""What a chain run records: the pretraining metrics and the stages' eval.json gathered into one result dict, plus the
provenance behind the numbers (hardware, library versions, git commit)."""

from __future__ import annotations

import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from launch.metrics import read_metrics
from recipes.cifar10.shards import split_sizes
from recipes.cifar10.stages import REPO, now_iso

EVAL_KEYS = ("top1", "top5", "n_images", "best_top1", "steps", "global_batch", "peak_lr", "path", "pool", "global_pool")


def collect(budget, args, data_dir: Path, probe_split: str, pt_dir: Path, runs: dict, stages: list[dict],
            total: float, started: str) -> dict:
    """Every number of the run in one JSON-able dict (the table and RESULTS.md are rendered from it)."""
    metrics = [m for m in read_metrics(pt_dir / "metrics.jsonl") if isinstance(m.get("loss"), (int, float))]
    curve = [[int(m["step"]), round(float(m["loss"]), 5)] for m in metrics if math.isfinite(m["loss"])]
    ips = [m["images_per_sec"] for m in metrics if isinstance(m.get("images_per_sec"), (int, float))]
    pt_cfg = read_yaml(pt_dir / "config.yaml")
    model_cfg, data_cfg = pt_cfg.get("model", {}), pt_cfg.get("data", {})
    sizes = split_sizes(data_dir)
    seconds = {s["stage"]: s["seconds"] for s in stages}
    pretrain = {
        "variant": model_cfg.get("name"), "mask_ratio": model_cfg.get("mask_ratio"),
        "norm_pix_loss": model_cfg.get("norm_pix_loss"),
        "steps": curve[-1][0] if curve else None, "batch_size": data_cfg.get("batch_size"),
        "epochs": metrics[-1].get("epoch") if metrics else None, "first_loss": curve[0][1] if curve else None,
        "final_loss": curve[-1][1] if curve else None, "median_images_per_sec": statistics.median(ips) if ips else None,
        "seconds": seconds.get("pretrain"), "loss_curve": curve,
    }
    rows = {}
    for key, ev in runs.items():
        rows[key] = {k: ev.get(k) for k in EVAL_KEYS}
        rows[key]["seconds"] = seconds.get(key)
    gaps = {"probe_top1_mae_minus_random": diff(rows["probe_mae"]["top1"], rows["probe_random"]["top1"]),
            "finetune_top1_mae_minus_scratch": diff(rows["finetune_mae"]["top1"], rows["finetune_scratch"]["top1"])}
    return {
        "budget": budget.name, "summary": budget.summary, "started": started, "finished": now_iso(),
        "total_seconds": round(total, 1), "command": shlex.join(["python", *args.argv_record]),
        "data": {"path": str(data_dir), "splits": sizes, "probe_train_split": probe_split,
                 "test_images": sizes.get("test")},
        "configs": {"pretrain": budget.pretrain_config, "probe": budget.probe_config,
                    "finetune": budget.finetune_config, "variant": budget.variant},
        "pretrain": pretrain, "runs": rows, "gaps": gaps, "stages": stages,
        "hardware": hardware(os.environ.get("OMP_NUM_THREADS") if args.threads is None else str(args.threads)),
        "git_commit": git_commit(),
    }


def diff(a, b):
    return round(a - b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def read_yaml(path: Path) -> dict:
    """The run's config.yaml as a dict ({} when it is missing or unreadable: the record then says None)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_field(path: str, prefix: str) -> str | None:
    """The value after ':' of the first line of a /proc file starting with `prefix`."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def hardware(threads: str | None = None) -> dict:
    """What the numbers were measured on: CPU model and cores, memory, GPU (nvidia-smi), the stages' thread count
    (OMP_NUM_THREADS as passed to them), library versions."""
    cpu = _first_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem_kb = _first_field("/proc/meminfo", "MemTotal")
    mem_gb = round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
            gpus = [g.strip() for g in out.splitlines() if g.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    versions = {}
    for pkg in ("torch", "timm", "accelerate", "webdataset"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_cores": cores, "memory_gb": mem_gb, "gpus": gpus, "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def git_commit() -> str | None:
    """The checkout's commit, with `+dirty` when files differ from it (untracked ones included)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None
