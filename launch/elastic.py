"""Stop on N processes, continue on M (issue 23): what a resume decides when the number of processes changed.

* The batch (`plan_batch`, called by `start_run` before the accelerator's accumulation is fixed): a resumed run keeps
  the checkpoint's global batch, so the lr schedule (a function of the step and the global batch) and the data
  position (`step x global batch` samples of the world-size-independent stream) go on unchanged. When the config's
  own split does not make that batch on this many processes, the micro-batch becomes the largest divisor of
  `global / processes` that is at most the config's `data.micro_batch` (else the saved one), so memory still fits,
  and the accumulation makes up the rest. A global batch that the process count does not divide is refused.
* Random streams (`reseed_ranks`): with the same number of processes every rank gets its own RNG states back from the
  checkpoint (bitwise resume). With another number there is no saved state for a new rank and the old ones belonged
  to other slices of the batch, so every rank restarts its python, NumPy and torch (CPU and CUDA) generators from
  `mix_seed(run.seed, "resume", step, rank)`: deterministic, and different per rank and per resume step. What is
  drawn per sample (augmentation, mask noise: data/train_stream.py) does not use these streams and stays exact;
  what the model draws per rank (drop path, mixup/cutmix's lambda, device random erasing) is statistically the same
  but not the same draws as an uninterrupted run's.
* The weights and optimizer state: DDP's checkpoint holds the full model and optimizer state (Accelerate's
  `model.safetensors` and `optimizer.bin`), FSDP2's is PyTorch's distributed checkpoint (DCP, saved by Accelerate
  with `SHARDED_STATE_DICT`), which reshards itself on load; both load on any number of processes as they are.
  DeepSpeed ZeRO partitions cannot be re-split, so `deepspeed_universal` converts the checkpoint with DeepSpeed's
  own universal-checkpoint converter (`deepspeed.checkpoint.ds_to_universal`: fp32 master weights and Adam moments
  per parameter, unpartitioned) and loads that with DeepSpeed's `load_universal` (each rank takes its new slice).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.seeding import mix_seed
from launch.checkpoint import STATE_FILE, CheckpointUnreadable, ResumeMismatch, complete_checkpoints
from launch.config import ConfigError
from launch.sections import RunConfig, resolve_batch

UNIVERSAL_PREFIX = ".universal-"  # checkpoints/.universal-step_NNNNNN/: a DeepSpeed checkpoint converted for loading


def newest_saved_state(run: RunConfig) -> dict | None:
    """The state JSON of the checkpoint a resume will start from (the newest complete one), read before anything
    is built; None for a fresh run (`run.resume=false`, or no checkpoint). A newest checkpoint whose JSON cannot be
    read is skipped here; `CheckpointManager.choose` names it when the session starts."""
    if not run.resume:
        return None
    for _, path in reversed(complete_checkpoints(Path(run.output_dir) / "checkpoints")):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return {**state, "_path": str(path)}
    return None


@dataclass(frozen=True)
class BatchPlan:
    micro: int  # images per process per micro-step
    accum: int  # micro-steps per optimizer step
    global_batch: int
    note: str | None = None  # what a resume chose and why (start-up output), None when the config's split was kept


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(saved: dict | None, world: int, micro: int | None, global_: int | None, accum: int) -> BatchPlan:
    """The micro-batch and accumulation of this start: the config's (`data.micro_batch` or `data.global_batch`,
    `optim.grad_accum_steps`), unless a resumed run's saved global batch needs another split on `world` processes
    (see the module docstring). Raises `ResumeMismatch` when `world` does not divide the saved global batch."""
    if saved is None or not saved.get("global_batch"):
        m, g = resolve_batch(micro, global_, world, accum)
        return BatchPlan(m, accum, g)
    kept = int(saved["global_batch"])
    try:
        m, g = resolve_batch(micro, global_, world, accum)
    except ConfigError:
        m, g = None, None
    if g == kept:
        return BatchPlan(m, accum, kept)
    path = Path(saved.get("_path", "checkpoint"))
    if kept % world:
        fits = ", ".join(str(d) for d in _divisors(kept) if d <= 4096)
        raise ResumeMismatch(f"cannot resume {path.parent.parent} from {path.name} on {world} processes: its global "
                             f"batch of {kept} images (the lr schedule and the data position assume it) does not "
                             f"split evenly over {world} processes; resume on a number of processes that divides "
                             f"{kept} ({fits}), or start a new run (another run.output_dir)")
    per_rank = kept // world
    saved_micro = saved.get("micro_batch")
    cap = micro or saved_micro or per_rank  # the memory the user allowed, else what the saved run used
    new_micro = max(d for d in _divisors(per_rank) if d <= cap)
    new_accum = per_rank // new_micro
    was = (f"saved: micro {saved_micro} x {saved.get('world_size')} processes x {saved.get('grad_accum_steps')} "
           f"accumulation" if saved_micro else f"saved on {saved.get('world_size')} processes")
    why = (f"the config's split would make {g}" if g is not None else "the config's split does not fit")
    limit = f"data.micro_batch={micro}" if micro else f"the saved {saved_micro}" if saved_micro else "none"
    note = (f"global batch {kept} kept ({why}): micro {new_micro} x {world} processes x {new_accum} accumulation "
            f"({was}; micro-batch limit: {limit})")
    return BatchPlan(new_micro, new_accum, kept, note)


def reseed_ranks(seed: int, step: int, rank: int) -> int:
    """Restart this rank's python, NumPy and torch (CPU and every CUDA device) random streams after a resume on
    another number of processes (see the module docstring); returns the seed used."""
    s = mix_seed(seed, "resume", step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also every CUDA generator
    return s


def rng_policy_line(step: int) -> str:
    return (f"random streams: each rank restarts from (run.seed, step {step}, rank); per-sample augmentation and "
            f"masks stay exact, per-rank model-side draws (drop path, mixup/cutmix, random erasing) are new draws")


def universal_dir(path: Path) -> Path:
    return path.parent / f"{UNIVERSAL_PREFIX}{path.name}"


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's universal checkpoint of `path/pytorch_model` (the ZeRO partitions of the model and optimizer)
    under `checkpoints/.universal-<name>/pytorch_model` (main process only; ds_to_universal's own converter, in this
    process: `num_*_workers=1` forks nothing from a process that holds a process group). Returns the folder that
    Accelerate's `load_state` takes. The conversion reads every partition and writes per-parameter fp32 weights and
    Adam moments: temporary disk of about the checkpoint's size, deleted after loading."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = universal_dir(path)
    shutil.rmtree(root, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path / "pytorch_model"), output_folder=str(root / "pytorch_model"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # Tessera's models carry no universal_checkpoint_info
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            ds_to_universal(args)
    except Exception as exc:  # noqa: BLE001 - reported in one line, the original chained
        shutil.rmtree(root, ignore_errors=True)
        raise CheckpointUnreadable(f"cannot convert the DeepSpeed checkpoint {path} for another number of processes "
                                   f"(deepspeed.checkpoint.ds_to_universal: {type(exc).__name__}: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); resume on the "
                                   f"number of processes that saved it, or start a new run from its consolidated "
                                   f"weights (model.init_from={path})") from exc
    return root


def repair_universal_load(accelerator, root: Path) -> None:
    """Undo two things DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3); written by hand, DeepSpeed has no switch for either:

    * it copies param group 0's settings into every group ("the hyperparameters of each parameter should be the
      same"), which drops the decayed group's weight decay (and layer-wise lr scales): each group gets its own saved
      settings back here, paired by index as ZeRO-1/2's universal load does, from the converted
      `zero/optimizer_state.pt` (checked by `check_safe` before; read with the weights-only unpickler);
    * it gives every parameter partition the same `step` tensor object, which torch's AdamW increments in place once
      per group per step, so the second group's bias correction runs ahead: each partition gets its own copy.
    Both are no-ops where the load was right (ZeRO-1/2)."""
    from launch.safe_load import _allowed_globals

    engine = accelerator.deepspeed_engine_wrapped.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW behind the ZeRO optimizer
    with torch.serialization.safe_globals(_allowed_globals()):
        saved = torch.load(root / "pytorch_model" / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=True)["param_groups"]
    if len(saved) != len(inner.param_groups):
        raise CheckpointUnreadable(f"the DeepSpeed checkpoint's optimizer has {len(saved)} param groups and this "
                                   f"run's has {len(inner.param_groups)}; start a new run from its weights")
    for group, own in zip(inner.param_groups, saved, strict=True):
        group.update({k: v for k, v in own.items() if k != "params"})
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def load_universal(accelerator):
    """DeepSpeed's engine reads a universal checkpoint while this is open (its `load_universal` config switch)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = before


__all__ = ["BatchPlan", "plan_batch", "newest_saved_state", "reseed_ranks", "rng_policy_line", "convert_to_universal",
           "load_universal", "repair_universal_load", "universal_dir", "UNIVERSAL_PREFIX"]
