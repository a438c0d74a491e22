"""`RUN_DIR/run.json`: where a run's numbers came from, written by the run itself (main process), read by harnesses.

    {"entry": "pretrain", "status": "finished", "command": [...], "cwd": ..., "git": {"commit", "dirty"},
     "python": "3.11.7", "packages": {"torch": ..., ...}, "hardware": {...}, "threads": 1, "world_size": 2,
     "distributed_type": "MULTI_CPU", "precision": "no", "zero_stage": null, "micro_batch": 8,
     "grad_accum_steps": 1, "global_batch": 16, "peak_lr": 6.25e-05, "steps": 40, "flops_per_image": ...,
     "start_time": ..., "end_time": ..., "final": {...},
     "segments": [{"start_step": 0, "end_step": 20, "world_size": 2, "status": "stopped", ...}, ...]}

Top-level fields describe the latest start of the run; `segments` keeps one entry per start (a resumed run appends
one), so the history of world sizes and stops is kept. Times are UTC ISO 8601. Written atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from launch.metrics import json_safe

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "deepspeed", "webdataset", "transformers", "numpy",
            "pillow", "safetensors", "tessera")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_state(repo: Path = REPO) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the code that runs (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def start_record(path: Path, fields: dict, start_step: int) -> dict:
    """The record of a run that starts (or resumes at `start_step`): provenance now, earlier segments kept."""
    from launch.hardware import describe

    old = read_record(path) if start_step else {}
    segments = [s for s in old.get("segments", []) if s.get("start_step", 0) < start_step]
    import platform

    import torch

    record = {**fields, "status": "running", "command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
              "git": git_state(), "python": platform.python_version(), "packages": package_versions(),
              "hardware": describe(), "threads": torch.get_num_threads(), "start_time": utc_now(), "end_time": None,
              "final": None}
    segments.append({"start_step": start_step, "end_step": None, "world_size": fields.get("world_size"),
                     "start_time": record["start_time"], "end_time": None, "status": "running"})
    record["segments"] = segments
    write_record(path, record)
    return record


def end_record(path: Path, record: dict, *, status: str, step: int, final: dict | None = None) -> dict:
    """Close the latest segment: status ("finished", "stopped", "failed"), the step reached, final metrics."""
    now = utc_now()
    record = {**record, "status": status, "end_time": now, "final": final}
    record["segments"] = [*record["segments"][:-1], {**record["segments"][-1], "end_step": step, "end_time": now,
                                                      "status": status}]
    write_record(path, record)
    return record


__all__ = ["start_record", "end_record", "read_record", "git_state", "package_versions", "utc_now", "PACKAGES"]
