"""Shared helpers for the launcher tests: free ports, tiny pretraining configs, subprocess runs of pretrain/mae.py
(one process, `accelerate launch` with 2 processes, DeepSpeed), and reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from launch.metrics import read_metrics as read_metrics_file

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SAMPLE = str(ROOT / "data" / "sample")
ENTRY = str(ROOT / "pretrain" / "mae.py")

# A 2-block, 32 px, patch-8 MAE (16 patches, 4 kept): a few ms per step on one CPU core.
TINY_MODEL = [
    "model.name=mae_vit_tiny_patch4_dec128d2b",
    "model.overrides.patch_size=8",
    "model.overrides.embed_dim=32",
    "model.overrides.depth=2",
    "model.overrides.num_heads=2",
    "model.overrides.decoder_embed_dim=32",
    "model.overrides.decoder_depth=1",
    "model.overrides.decoder_num_heads=2",
]


def tiny_args(run_dir, *extra: str, steps: int = 6, batch: int = 8, workers: int = 0) -> list[str]:
    """Overrides for a tiny, quiet pretraining run on the shipped sample shards."""
    return [
        *TINY_MODEL,
        f"data.train={SAMPLE}",
        f"data.micro_batch={batch}",
        f"data.num_workers={workers}",
        f"run.output_dir={run_dir}",
        f"run.steps={steps}",
        "run.log_every=1",
        f"run.save_every={steps}",
        "run.trackers=none",
        "run.progress=false",
        "run.precision=no",
        "optim.warmup_steps=2",
        "vis.num_images=2",
        "vis.every=0",
        *extra,
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    """Subprocess environment: one thread, the repo importable, no stray launcher settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def ddp_cmd(args: list[str], port: int) -> list[str]:
    """Two CPU processes (gloo) through the shipped launch/accelerate/cpu_2proc.yaml."""
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
            "--main_process_port", str(port), ENTRY, *args]


def deepspeed_cmd(args: list[str], port: int, stage: int = 2, nproc: int = 2) -> list[str]:
    """The shipped ZeRO yaml with the process count and fp32 for a CPU box."""
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "accelerate" / f"zero{stage}.yaml"),
            "--num_processes", str(nproc), "--main_process_port", str(port), "--mixed_precision", "no",
            ENTRY, *args]


def run(cmd: list[str], timeout: float = 180, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (the project's reader; a cut-short last line is skipped)."""
    return read_metrics_file(Path(run_dir) / "metrics.jsonl")


def wait_for_step(proc: subprocess.Popen, step: int) -> int:
    """Read the run's plain log lines (`step N/M loss ...`, printed with run.progress=false) from `proc.stdout`
    until one reports `step >= step`; returns that step. Blocks on the pipe, no polling."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return int(line.split()[1].split("/")[0])
    raise AssertionError(f"process ended (rc {proc.wait()}) before step {step}")
