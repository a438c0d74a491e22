"""Resumable checkpoints: atomic, named by optimizer step, the last K kept; plus the full-precision weight export.

Layout: `RUN_DIR/checkpoints/step_000100/` holds what `accelerator.save_state` writes (model, optimizer, GradScaler,
RNG states of every rank; DeepSpeed's partitioned states under DeepSpeed) and `tessera_state.json` (our extra
state: step, data position, counters, resolved config, model-shape fingerprint, world size).

Atomicity: every rank writes into `checkpoints/.tmp-step_000100/`; after a barrier the main process adds the JSON
(last, so a directory without it is incomplete) and renames the directory to `step_000100`. A kill at any moment
leaves the previous checkpoints whole; stale `.tmp-*` directories are ignored and deleted at the next save or load.
The rename is done by the global main process, so multi-node runs need a shared file system for `output_dir`.
Accelerate's automatic checkpoint naming is not used (its counter collides after `load_state`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

STATE_FILE = "tessera_state.json"
_NAME = re.compile(r"^step_(\d+)$")


class ResumeMismatch(RuntimeError):
    """The checkpoint cannot be resumed with the current config (model shape or DeepSpeed world size changed)."""


def model_fingerprint(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every parameter and buffer (call on the model before `prepare`; ZeRO-3 partitions shapes)."""
    shapes = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        shape = getattr(tensor, "ds_shape", None) or tensor.shape
        shapes[name] = [int(s) for s in shape]
    return shapes


def fingerprint_changes(saved: dict[str, list[int]], current: dict[str, list[int]], limit: int = 12) -> list[str]:
    """Human-readable differences between two fingerprints (missing/new tensors, changed shapes)."""
    changes = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            changes.append(f"{name}: in the checkpoint {saved[name]}, absent from the model")
        elif name not in saved:
            changes.append(f"{name}: new in the model {current[name]}, absent from the checkpoint")
        elif list(saved[name]) != list(current[name]):
            changes.append(f"{name}: checkpoint {list(saved[name])} vs model {list(current[name])}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"... and {len(changes) - limit} more"]
    return changes


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (`to_dict` output)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class CheckpointManager:
    """`save(step, state)` on every rank at a step boundary; `load_latest()` on every rank after `prepare`."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------------------------------ listing

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            m = _NAME.match(path.name)
            if m and (path / STATE_FILE).is_file():
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    def _clean_stale(self) -> None:
        if self.accelerator.is_main_process and self.dir.is_dir():
            for path in self.dir.glob(".tmp-*"):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Save model/optimizer/scaler/RNG (via Accelerate) and `state` as `checkpoints/step_<step>`, atomically."""
        acc = self.accelerator
        final = self.path_for(step)
        tmp = self.dir / f".tmp-{final.name}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._clean_stale()
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            record = {**state, "step": int(step), "world_size": acc.num_processes}
            with (tmp / STATE_FILE).open("w") as fh:
                json.dump(record, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeMismatch(f"checkpoint {path} has an unreadable {STATE_FILE}: {exc}") from None

    def load_latest(self, expect_fingerprint: dict | None = None, config: dict | None = None) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint through `accelerator.load_state`; return its extra state.

        `expect_fingerprint` (from `model_fingerprint`) is compared with the saved one first: a checkpoint of a model
        with other shapes is refused with a `ResumeMismatch` naming the tensors (and, given `config`, the config
        keys) that changed. Under DeepSpeed a different world size is refused too (ZeRO partitions cannot be re-split).
        """
        self._clean_stale()
        path = self.latest()
        if path is None:
            return None
        state = self.read_state(path)
        if expect_fingerprint is not None and state.get("fingerprint") is not None:
            changes = fingerprint_changes(state["fingerprint"], expect_fingerprint)
            if changes:
                lines = [f"cannot resume from {path}: the model's shape changed."]
                if config is not None and isinstance(state.get("config"), dict):
                    keys = [c for c in config_changes(state["config"], config) if not c.startswith("run.")]
                    if keys:
                        lines.append("config changes: " + "; ".join(keys))
                lines.append("tensors: " + "; ".join(changes))
                lines.append("use another run.output_dir, or run.resume=false to start over (it overwrites checkpoints)")
                raise ResumeMismatch("\n  ".join(lines))
        saved_world = state.get("world_size")
        if (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and saved_world is not None
            and saved_world != self.accelerator.num_processes
        ):
            raise ResumeMismatch(
                f"cannot resume from {path}: it was saved by {saved_world} DeepSpeed processes and this run has "
                f"{self.accelerator.num_processes}; ZeRO optimizer partitions cannot be re-split. Resume with "
                f"{saved_world} processes, or start a new run from its consolidated weights "
                f"(deepspeed.utils.zero_to_fp32 on {path})"
            )
        self.accelerator.load_state(str(path))
        return state


def frozen_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the parameters that do not train (e.g. fixed sin-cos position embeddings); take them before
    `prepare`, because DeepSpeed's bf16/fp16 model holds them only in the compute dtype (no fp32 master copy)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}


def export_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, checkpoint: Path | None = None,
    frozen: dict[str, torch.Tensor] | None = None,
) -> dict | None:
    """Full-shape, float32 weights of the (prepared) model on the main process, None elsewhere. Call on ALL ranks.

    DDP / one process: `accelerator.get_state_dict`. DeepSpeed: the fp32 master weights consolidated from the
    checkpoint directory `checkpoint` (ZeRO-2/3 partitions merged by DeepSpeed's `zero_to_fp32`), so a bf16 run
    still exports full precision. Frozen parameters have no fp32 master there (they are stored in the compute
    dtype): pass their fp32 values as `frozen` (see `frozen_parameters`) to export those instead.
    """
    acc = accelerator
    acc.wait_for_everyone()
    if acc.distributed_type == DistributedType.DEEPSPEED:
        if checkpoint is None:
            raise ValueError("under DeepSpeed, export_state_dict needs the checkpoint directory saved at the end")
        state = None
        if acc.is_main_process:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
            for name, value in (frozen or {}).items():
                if name in state:
                    if tuple(state[name].shape) != tuple(value.shape):
                        raise ValueError(f"frozen parameter {name}: {tuple(value.shape)} vs checkpoint {tuple(state[name].shape)}")
                    state[name] = value
        acc.wait_for_everyone()
    else:
        state = acc.get_state_dict(model)
        if not acc.is_main_process:
            state = None
    if state is None:
        return None
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone() for k, v in state.items()}


__all__ = [
    "CheckpointManager",
    "ResumeMismatch",
    "STATE_FILE",
    "model_fingerprint",
    "fingerprint_changes",
    "config_changes",
    "export_state_dict",
    "frozen_parameters",
]
