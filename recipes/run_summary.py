"""What a recipe keeps of one run directory, read from the files the run wrote itself (`launch/run_files.py`):
run.json (batch arithmetic, status, times; the provenance: commit, packages, hardware), metrics.jsonl (loss curve,
median images/s, epoch, k-NN top-1), eval.json (accuracies) and config.yaml's model section."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

import yaml

from launch import run_files
from launch.metrics import read_metrics

RUN_KEYS = ("entry", "status", "world_size", "precision", "micro_batch", "global_batch", "steps", "peak_lr",
            "flops_per_image", "start_time", "end_time")
EVAL_KEYS = ("top1", "top5", "n_images", "steps", "global_batch")
MODEL_KEYS = ("name", "objective", "target", "mask_ratio", "norm_pix_loss")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path, skip: int = 0) -> dict:
    """{"run": ..., "model": ..., "metrics": ..., "eval": ...}, each present when the run wrote it; the median
    images/s counts the steps after `skip` (a calibration's warm-up)."""
    out = {}
    if record := read_json(run_dir / run_files.RUN_RECORD):
        out["run"] = {k: record[k] for k in RUN_KEYS if k in record}
    config = yaml.safe_load((run_dir / run_files.CONFIG).read_text()) if (run_dir / run_files.CONFIG).is_file() else {}
    if model := {k: v for k, v in (config or {}).get("model", {}).items() if k in MODEL_KEYS}:
        out["model"] = model
    if rows := read_metrics(run_dir / run_files.METRICS):
        out["metrics"] = summarise(rows, skip)
    if evaluation := read_json(run_dir / run_files.EVAL):
        out["eval"] = {k: evaluation[k] for k in EVAL_KEYS if k in evaluation}
    return out


def summarise(rows: list[dict], skip: int = 0) -> dict:
    """The metrics a results page shows: last step and epoch, median images/s after `skip`, the last k-NN top-1 (a
    fraction, as logged) and the loss curve ([step, loss] of every finite logged loss, 5 decimals)."""
    def last(key):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return values[-1] if values else None

    rates = [r["images_per_sec"] for r in rows if r.get("step", 0) > skip and "images_per_sec" in r]
    curve = [[r["step"], round(r["loss"], 5)] for r in rows
             if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    return {"steps": last("step"), "epoch": last("epoch"), "knn_top1": last("knn_top1"),
            "images_per_sec": statistics.median(rates) if rates else None, "loss_curve": curve}


def provenance(run_dir: Path) -> dict:
    """Where a run's numbers came from, as its run.json says (the host name left out), and the Python version of the
    interpreter the recipe ran the stages with (run.json does not record it)."""
    record = read_json(run_dir / run_files.RUN_RECORD)
    hardware = {k: v for k, v in record.get("hardware", {}).items() if k != "host"}
    return {"git": record.get("git"), "python": platform.python_version(), "packages": record.get("packages", {}),
            "hardware": hardware}


def commit(prov: dict) -> str:
    """The short commit, `+dirty` when the checkout differed from it."""
    git = prov.get("git") or {}
    return (git.get("commit") or "?")[:7] + ("+dirty" if git.get("dirty") else "")
