"""Opening a run on every rank: the run directory, its config.yaml, the checkpoint manager (resumed from the newest
complete checkpoint when `run.resume` and one exists), metrics.jsonl and the trackers.

Shared by the three entry points, so they resume, refuse a changed model, and log the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from launch.checkpoint import CheckpointManager
from launch.config import save_config, to_dict
from launch.metrics import MetricsLogger


@dataclass
class Session:
    run_dir: Path
    ckpt: CheckpointManager
    metrics: MetricsLogger
    config: dict  # the resolved config (`to_dict`), stored in every checkpoint
    state: dict = field(default_factory=dict)  # the resumed checkpoint's extra state ({} for a fresh run)

    @property
    def start_step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def resumed(self) -> bool:
        return bool(self.state)


def flat(d: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (the trackers take flat scalar configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def open_session(accelerator: Accelerator, cfg, *, fingerprint: dict, name: str) -> Session:
    """Call on every rank after `accelerator.prepare` (loading a checkpoint restores the prepared objects)."""
    run_dir = Path(cfg.run.output_dir)
    config = to_dict(cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    ckpt = CheckpointManager(accelerator, run_dir, keep=cfg.run.keep_checkpoints)
    metrics = MetricsLogger(run_dir, accelerator)
    state = (ckpt.load_latest(expect_fingerprint=fingerprint, config=config) if cfg.run.resume else None) or {}
    if state:
        metrics.truncate_after(int(state["step"]))
        if accelerator.is_main_process:
            print(f"[{name}] resuming at step {state['step']} from {ckpt.latest()}", flush=True)
    scalars = {k: v for k, v in flat(config).items() if isinstance(v, (int, float, str, bool))}
    wandb = "wandb" in cfg.run.trackers
    accelerator.init_trackers(cfg.run.wandb_project if wandb else name, config=scalars,
                              init_kwargs={"wandb": {"name": run_dir.name}} if wandb else {})
    return Session(run_dir=run_dir, ckpt=ckpt, metrics=metrics, config=config, state=state)


__all__ = ["Session", "open_session", "flat"]
