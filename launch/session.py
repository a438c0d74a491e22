"""Opening a run on every rank: the run directory (claimed: a lock naming its holder, no fresh start over another
run's checkpoints, `launch/run_dir.py`), its config.yaml, the checkpoint manager (resumed from the newest complete
checkpoint when `run.resume` and one exists), metrics.jsonl and the trackers. `Session.close()` at the end.

Shared by the three entry points, so they resume, refuse a changed model, and log the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from launch.checkpoint import CheckpointManager
from launch.config import save_config, to_dict
from launch.errors import UserError
from launch.metrics import MetricsLogger
from launch.run_dir import RunDirClaim, claim_run_dir

# claims this process holds, by directory: a run that ended by an exception in-process (tests, notebooks) leaves
# its claim here, and the next run of the same process into the same directory takes it back
_CLAIMS: dict[Path, RunDirClaim] = {}


@dataclass
class Session:
    run_dir: Path
    ckpt: CheckpointManager
    metrics: MetricsLogger
    config: dict  # the resolved config (`to_dict`), stored in every checkpoint
    state: dict = field(default_factory=dict)  # the resumed checkpoint's extra state ({} for a fresh run)
    claim: RunDirClaim | None = None  # the run directory's lock (main process)

    @property
    def start_step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def resumed(self) -> bool:
        return bool(self.state)

    def stopped(self, name: str, done, is_main: bool) -> dict:
        """After a loop stopped by a signal: say where the checkpoint is, close, and return the run's summary."""
        if is_main:
            print(f"[{name}] stopped by {done.stopped_by} at step {done.step}; checkpoint saved in {done.checkpoint}. "
                  f"Re-run the same command to resume.", flush=True)
        self.close()
        return {"step": done.step, "stopped_by": done.stopped_by, "run_dir": str(self.run_dir)}

    def close(self) -> None:
        """End the trackers and release the run directory."""
        self.metrics.close()
        if self.claim is not None:
            self.claim.release()
            _CLAIMS.pop(self.run_dir.resolve(), None)


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
    claim, error = None, None
    if accelerator.is_main_process:
        if (old := _CLAIMS.pop(run_dir.resolve(), None)) is not None:
            old.release()
        try:
            claim = claim_run_dir(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
            _CLAIMS[run_dir.resolve()] = claim
        except UserError as exc:
            error = str(exc)
    if accelerator.num_processes > 1:  # every rank stops with the main process's message
        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise UserError(error)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    ckpt = CheckpointManager(accelerator, run_dir, keep=cfg.run.keep_checkpoints)
    metrics = MetricsLogger(run_dir, accelerator)
    state = (ckpt.load_latest(expect_fingerprint=fingerprint, config=config) if cfg.run.resume else None) or {}
    if state:
        state["path"] = str(ckpt.latest())  # the checkpoint resumed from
        metrics.truncate_after(int(state["step"]))
        if accelerator.is_main_process:
            print(f"[{name}] resuming at step {state['step']} from {ckpt.latest()}", flush=True)
    scalars = {k: v for k, v in flat(config).items() if isinstance(v, (int, float, str, bool))}
    wandb = "wandb" in cfg.run.trackers
    accelerator.init_trackers(cfg.run.wandb_project if wandb else name, config=scalars,
                              init_kwargs={"wandb": {"name": run_dir.name}} if wandb else {})
    return Session(run_dir=run_dir, ckpt=ckpt, metrics=metrics, config=config, state=state, claim=claim)


__all__ = ["Session", "open_session", "flat"]
