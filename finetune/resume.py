"""Checkpoint manager, metrics logger and resume state shared by `linprobe.py` and `finetune.py`."""

from __future__ import annotations

from pathlib import Path

from launch.config import to_dict


def open_run(accelerator, cfg, run_dir: Path, fingerprint, name: str):
    """-> (ckpt, logger, step, best_top1, data_pos): resumed from the newest checkpoint when `run.resume` and one
    exists (refused with a clear message when the model's shape changed), else from the start."""
    from launch.checkpoint import CheckpointManager  # imported here: Accelerate is slow to import, --help is not
    from launch.metrics import MetricsLogger

    ckpt = CheckpointManager(accelerator, run_dir, keep=cfg.run.keep_checkpoints)
    logger = MetricsLogger(run_dir, accelerator)
    step, best_top1, data_pos = 0, -1.0, 0
    if cfg.run.resume:
        state = ckpt.load_latest(expect_fingerprint=fingerprint, config=to_dict(cfg))
        if state is not None:
            step, best_top1 = int(state["step"]), float(state.get("best_top1", -1.0))
            data_pos = int(state.get("data", {}).get("batches", 0))
            logger.truncate_after(step)
            if accelerator.is_main_process:
                print(f"[{name}] resumed at step {step} (best top1 so far {best_top1:.2f})")
    return ckpt, logger, step, best_top1, data_pos
