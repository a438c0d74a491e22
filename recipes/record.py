"""A recipe's stored record, docs/results/NAME.json, what its page is rendered from: the recipe's header, provenance,
and every stage with what its run wrote itself: run.json, metrics.jsonl, eval.json, config.yaml's model section."""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
from pathlib import Path

import yaml

from launch import run_files
from launch.metrics import read_metrics
from launch.run_record import read_record
from recipes.stages import public

RUN_KEYS = ("entry", "status", "world_size", "precision", "micro_batch", "global_batch", "steps", "peak_lr",
            "flops_per_image", "start_time", "end_time")
EVAL_KEYS = ("top1", "top5", "n_images", "steps", "global_batch")
MODEL_KEYS = ("name", "objective", "target", "mask_ratio", "norm_pix_loss")


def read_run(run_dir: Path, skip: int = 0) -> dict:
    """{"run", "model", "metrics", "eval"} as the run wrote them; the median images/s of the steps after `skip`."""
    out, record, evaluation = {}, read_record(run_dir / run_files.RUN_RECORD), read_record(run_dir / run_files.EVAL)
    config = yaml.safe_load((run_dir / run_files.CONFIG).read_text()) if (run_dir / run_files.CONFIG).is_file() else {}
    if record:
        out["run"] = {k: record[k] for k in RUN_KEYS if k in record}
    if model := {k: v for k, v in (config or {}).get("model", {}).items() if k in MODEL_KEYS}:
        out["model"] = model
    if rows := read_metrics(run_dir / run_files.METRICS):
        def last(key):
            return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)

        rates = [r["images_per_sec"] for r in rows if r.get("step", 0) > skip and "images_per_sec" in r]
        out["metrics"] = {"steps": last("step"), "epoch": last("epoch"), "knn_top1": last("knn_top1"),
                          "knn_top1_init": last("knn_top1_init"), "knn_top1_pixels": last("knn_top1_pixels"),
                          "images_per_sec": statistics.median(rates) if rates else None,
                          "loss_curve": [[r["step"], round(r["loss"], 5)] for r in rows
                                         if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]}
    if evaluation:
        out["eval"] = {k: evaluation[k] for k in EVAL_KEYS if k in evaluation}
    return out


def collect(header: dict, stages: list[dict], run_dirs: dict[str, Path], folders: dict[str, Path],
            skip: dict[str, int] | None = None) -> dict:
    """The record: the header, the first run's provenance (its run.json without the host; the Python version of the
    stages' interpreter, which run.json lacks), and every stage with its run."""
    first = read_record(next(iter(run_dirs.values())) / run_files.RUN_RECORD)
    provenance = {"git": first.get("git"), "python": platform.python_version(), "packages": first.get("packages", {}),
                  "hardware": {k: v for k, v in first.get("hardware", {}).items() if k != "host"}}
    return {**header, "provenance": provenance,
            "stages": [{"stage": s["stage"], "command": public(s["command"], folders), "seconds": s["seconds"],
                        "reused": s["reused"], **(read_run(run_dirs[s["stage"]], (skip or {}).get(s["stage"], 0))
                                                  if s["stage"] in run_dirs else {})} for s in stages]}


def save_record(path: Path, record: dict) -> Path:
    """Indented JSON with every list of numbers (the loss curves) on one line, so the file stays short."""
    text = re.sub(r"\[[\d\s.,eE+\-\[\]]*\]", lambda m: "".join(m.group().split()), json.dumps(record, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def stage(record: dict, name: str) -> dict:
    """The stage of that name in a stored record ({} when it did not run)."""
    return next((s for s in record["stages"] if s["stage"] == name), {})


def commit(record: dict) -> str:
    """The short commit of the record's provenance, `+dirty` when the checkout differed from it."""
    git = record["provenance"].get("git") or {}
    return (git.get("commit") or "?")[:7] + ("+dirty" if git.get("dirty") else "")
