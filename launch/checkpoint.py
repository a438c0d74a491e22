"""Resumable checkpoints: atomic, named by optimizer step, the last K kept; plus the full-precision weight export.

Layout: `RUN_DIR/checkpoints/step_000100/` holds what `accelerator.save_state` writes (model, optimizer, GradScaler,
RNG states of every rank; DeepSpeed's partitioned states under DeepSpeed), `tessera_registered.safetensors` (the
tensors of the state the run registered with its session: an EMA, data2vec's teacher) and `tessera_state.json` (our
extra state: step, data position, counters, resolved config, model-shape fingerprint, world size, and the non-tensor
part of the registered state). Nothing goes through Accelerate's `register_for_checkpointing`, which pickles.

Atomicity: every rank writes into `checkpoints/.tmp-step_000100/`; after a barrier the main process adds the JSON
(last, so a directory without it is incomplete) and renames the directory to `step_000100`. A kill at any moment
leaves the previous checkpoints whole; stale `.tmp-*` directories are ignored and deleted at the next save or load.
The rename is done by the global main process, so multi-node runs need a shared file system for `output_dir`.
Accelerate's automatic checkpoint naming is not used (its counter collides after `load_state`).

Failures are named, not tracebacks:
* a save that fails (all ranks agree on it) removes its temporary directory; a full disk (ENOSPC/EDQUOT, or torch's
  "unexpected pos" with no space left) raises `CheckpointWriteError` saying so, naming the path, the free space and
  the previous checkpoint, which is intact;
* rotation keeps the checkpoint just saved and the newest `keep - 1` older ones; a checkpoint with a higher step
  (another run's, in a directory that was not cleared) is moved aside to `RUN_DIR/replaced-<time>/`, never deleted;
* `load_latest` checks the newest complete checkpoint's files first (safetensors header against the file size, the
  zip directory of every torch.save file, the state JSON): a truncated or corrupt one gives one warning naming it, is
  renamed `step_NNNNNN.corrupt` and the previous complete checkpoint is used; a checkpoint that still fails to load
  raises `CheckpointUnreadable` naming it and the way out;
* before anything is loaded, every pickle-based file of the chosen checkpoint (what Accelerate and DeepSpeed write
  with torch.save) is read with torch's weights-only unpickler (`launch/safe_load.py`): a file that would run code
  when loaded, or that is no torch.save file at all, refuses the resume (`CheckpointUnsafe`, naming the file).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from core.errors import UserError
from launch.safe_load import DCP_METADATA, DCP_SUFFIX, dcp_problem

STATE_FILE = "tessera_state.json"
REGISTERED_FILE = "tessera_registered.safetensors"  # tensors of the state registered with the session
CORRUPT_SUFFIX = ".corrupt"
REPLACED_PREFIX = "replaced-"  # RUN_DIR/replaced-<UTC time>/: what a new run moved out of its way
_NAME = re.compile(r"^step_(\d+)$")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch's zip writer reports a failed write (e.g. no space left) as "unexpected pos" / "file write failed"
_WRITE_FAILED = ("unexpected pos", "file write failed", "No space left", "os error 28", "Disk quota exceeded")
LOW_SPACE_BYTES = 64 * 2**20  # after a failed write, less free space than this means the disk filled up


class ResumeMismatch(UserError):
    """The checkpoint cannot be resumed with the current config (model shape or DeepSpeed world size changed)."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk); the previous checkpoint is intact."""


class CheckpointUnreadable(UserError):
    """The checkpoint chosen for resuming cannot be loaded; the message names it and the way out."""


class CheckpointUnsafe(UserError):
    """A file of the checkpoint chosen for resuming would run code when loaded; the message names it."""


def warn(message: str) -> None:
    """A warning the user must see: stderr, flushed, prefixed with the process rank under a launcher."""
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank not in (None, "", "0") else ""
    print(f"WARNING{where}: {message}", file=sys.stderr, flush=True)


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (`step_N/` holding the state JSON) in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        m = _NAME.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def move_aside(run_dir: str | Path, paths: list[Path], stamp: str | None = None) -> Path:
    """Move `paths` (inside `run_dir`) into `run_dir/replaced-<stamp>/`, keeping their paths relative to run_dir."""
    run_dir = Path(run_dir)
    target = base = run_dir / f"{REPLACED_PREFIX}{stamp or utc_stamp()}"
    n = 1
    while target.exists():  # two replacements within one second
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    for path in paths:
        dest = target / Path(path).resolve().relative_to(run_dir.resolve())
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    return target


def _check_safetensors(path: Path, name: str) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{name} has {size} bytes, too short for a safetensors file"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{name} has {size} bytes but its header alone needs {n + 8} (truncated)"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{name} has an unreadable safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{name} has {size} bytes, {need} expected (truncated)"
    return None


def _check_zip(path: Path, name: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:  # reads the central directory at the end: a truncated file has none
            zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{name} is not a complete torch.save file ({exc})"
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with a complete-looking checkpoint directory, or None. Cheap: reads headers and zip
    directories, never the tensors. Checks the state JSON, every *.safetensors file, every torch.save (zip) file
    and every distributed checkpoint (DCP) folder's files against its .metadata, which covers what Accelerate,
    DeepSpeed and FSDP2 write."""
    path = Path(path)
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = str(file.relative_to(path))
        try:
            if file.suffix == ".safetensors":
                problem = _check_safetensors(file, name)
            elif file.name == DCP_METADATA:  # a distributed checkpoint (FSDP2): its files against its metadata
                problem = dcp_problem(file.parent)
                problem = problem and f"{file.parent.relative_to(path)}: {problem}"
            elif file.suffix == DCP_SUFFIX:  # checked through its folder's .metadata
                problem = None if (file.parent / DCP_METADATA).is_file() else f"{name} has no {DCP_METADATA} beside it"
            else:
                with file.open("rb") as fh:
                    magic = fh.read(4)
                problem = _check_zip(file, name) if magic == b"PK\x03\x04" else None
        except OSError as exc:
            problem = f"{name} cannot be read ({exc})"
        if problem:
            return problem
    return None


def _is_disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if any(text in str(exc) for text in _WRITE_FAILED):
        try:
            return shutil.disk_usage(where).free < LOW_SPACE_BYTES or "unexpected pos" not in str(exc)
        except OSError:
            return True
    return False


def _free_space(where: Path) -> str:
    try:
        return f"{shutil.disk_usage(where).free / 2**20:.1f} MiB were free when it failed"
    except OSError:
        return "free space unknown"


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
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------------------------------ listing

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        return complete_checkpoints(self.dir)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    def _clean_stale(self) -> None:
        if self.accelerator.is_main_process and self.dir.is_dir():
            for pattern in (".tmp-*", ".universal-*"):  # unfinished saves, conversions of an interrupted resume
                for path in self.dir.glob(pattern):
                    shutil.rmtree(path, ignore_errors=True)

    def _any(self, flag: bool) -> bool:
        """True when `flag` is true on any process (one small all-reduce; only on the rare failure paths' checks)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # ------------------------------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Save model/optimizer/scaler/RNG (via Accelerate), `tensors` (the main process's, as safetensors) and
        `state` (JSON) as `checkpoints/step_<step>`, atomically."""
        acc = self.accelerator
        final = self.path_for(step)
        tmp = self.dir / f".tmp-{final.name}"
        error: BaseException | None = None
        try:
            if acc.is_main_process:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._clean_stale()
        except OSError as exc:
            error = exc
        acc.wait_for_everyone()
        if error is None:
            try:
                acc.save_state(str(tmp))
            except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError on a failed write
                error = exc
        if not self._any(error is not None) and acc.is_main_process:
            try:
                if tensors:
                    from safetensors.torch import save_file

                    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                              str(tmp / REGISTERED_FILE))
                record = {**state, "step": int(step), "world_size": acc.num_processes}
                with (tmp / STATE_FILE).open("w") as fh:
                    json.dump(record, fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                error = exc
        if self._any(error is not None):
            self._failed(final, tmp, error)
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate(step)
        acc.wait_for_everyone()
        return final

    def _failed(self, final: Path, tmp: Path, error: BaseException | None) -> None:
        """Clean up after a save that failed on some process and raise (every process raises)."""
        full = error is not None and _is_disk_full(error, self.dir if self.dir.exists() else self.run_dir)
        space = _free_space(self.dir if self.dir.exists() else self.run_dir)  # before the partial files go
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is intact; re-running the same command resumes from it"
                if previous else "there is no earlier checkpoint of this run")
        if error is None:  # this process wrote its part; another one failed and reports why
            raise CheckpointWriteError(f"saving checkpoint {final.name} failed on another process (its message says "
                                       f"why); {kept}")
        if full:
            raise CheckpointWriteError(
                f"the disk is full: saving checkpoint {final.name} into {self.dir} failed ({_short(error)}); "
                f"{space}. The partial checkpoint was removed and {kept}. Free space there (or set run.output_dir "
                f"to a larger file system, or lower run.keep_checkpoints)") from None
        raise error

    def _rotate(self, step: int) -> None:
        """Keep the checkpoint of `step` and the newest keep-1 older ones; move newer-step ones (another run's)
        aside. Main process only."""
        done = self.complete()
        newer = [p for s, p in done if s > step]
        if newer:
            target = move_aside(self.run_dir, newer)
            warn(f"{self.dir} held checkpoints with higher steps than this run's step {step} "
                 f"({', '.join(p.name for p in newer)}), from another run; moved them to {target} so that resuming "
                 f"picks this run's checkpoints")
        older = [p for s, p in done if s < step]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointUnreadable(f"checkpoint {path} has an unreadable {STATE_FILE}: {exc}") from None

    def choose(self) -> Path | None:
        """The newest complete checkpoint whose files check out (main process decides, all ranks get the answer).
        Each newer one that does not is named in a warning and renamed `<name>.corrupt`."""
        chosen, unsafe = None, None
        if self.accelerator.is_main_process:
            self._clean_stale()
            bad = []
            for _, path in reversed(self.complete()):
                unsafe = self._unsafe(path)  # a planted file is refused, not taken for a corrupt one
                if unsafe is not None:
                    break
                problem = verify_checkpoint(path)
                if problem is None:
                    chosen = str(path)
                    break
                bad.append((path, problem))
            for path, problem in bad:
                kept = path.with_name(path.name + CORRUPT_SUFFIX)
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(path, kept)
                instead = (f"resuming from the previous complete checkpoint {chosen} instead" if chosen else
                           "no older complete checkpoint is left: starting from the beginning")
                warn(f"checkpoint {path} is incomplete or corrupt: {problem}. Kept as {kept}; {instead}")
        if self.accelerator.num_processes > 1:
            box = [chosen, unsafe]
            broadcast_object_list(box, from_process=0)
            chosen, unsafe = box
        if unsafe is not None:
            raise CheckpointUnsafe(unsafe)
        return Path(chosen) if chosen else None

    def _unsafe(self, path: Path) -> str | None:
        """Why a checkpoint directory must not be loaded: the first file that would run code (`launch/safe_load.py`)."""
        from launch.safe_load import unsafe_file

        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            why = unsafe_file(file)
            if why is not None:
                return (f"refusing to resume from {path}: {file.relative_to(path)} cannot be read without running "
                        f"code: {why}. Tessera and the libraries it uses never write such a file; if you do not "
                        f"trust the run directory, delete the checkpoint (rm -r {path})")
        return None

    def check_safe(self, path: Path) -> None:
        """Refuse (every rank) a checkpoint with a file that would run code when loaded."""
        problem = self._unsafe(path) if self.accelerator.is_main_process else None
        if self.accelerator.num_processes > 1:
            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem is not None:
            raise CheckpointUnsafe(problem)

    def load_latest(self) -> dict[str, Any] | None:
        """`load(choose())`'s state JSON, or None when there is no complete checkpoint."""
        path = self.choose()
        return None if path is None else self.load(path)[0]

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore a checkpoint chosen by `choose` (every rank): its files are checked first (`check_safe`), then
        `accelerator.load_state` restores model, optimizer, scaler and RNG states. Returns (the state JSON, the
        registered tensors)."""
        from safetensors.torch import load_file

        state = self.read_state(path)
        self.check_safe(path)
        acc = self.accelerator
        regroup = (acc.distributed_type == DistributedType.DEEPSPEED
                   and state.get("world_size") not in (None, acc.num_processes))
        try:
            if regroup:  # ZeRO partitions of another number of processes: through DeepSpeed's universal checkpoint
                self._load_deepspeed_universal(path)
            else:
                acc.load_state(str(path))
            tensors = load_file(str(path / REGISTERED_FILE)) if (path / REGISTERED_FILE).is_file() else {}
        except (CheckpointUnreadable, CheckpointUnsafe):
            raise
        except Exception as exc:  # noqa: BLE001 - named for the user; the original is chained for debugging
            older = [p for _, p in self.complete() if p != path]
            way = (f"move it aside (mv {path} {path}{CORRUPT_SUFFIX}) to resume from {older[-1]}" if older else
                   "start over with run.resume=false run.overwrite=true")
            raise CheckpointUnreadable(f"cannot load checkpoint {path}: {_short(exc)}; {way}") from exc
        return state, tensors


    def _load_deepspeed_universal(self, path: Path) -> None:
        """Load a DeepSpeed checkpoint saved by another number of processes (`launch/elastic.py`): the main process
        converts it to DeepSpeed's universal format next to it, every rank checks and loads that, and it is
        deleted."""
        from launch.elastic import convert_to_universal, load_universal, repair_universal_load, universal_dir

        acc, error = self.accelerator, None
        if acc.is_main_process:
            try:
                convert_to_universal(path)
            except CheckpointUnreadable as exc:
                error = str(exc)
        if acc.num_processes > 1:
            error = broadcast_object_list([error], from_process=0)[0]
        if error is not None:
            raise CheckpointUnreadable(error)
        root = universal_dir(path)
        try:
            self.check_safe(root)
            with load_universal(acc):
                acc.load_state(str(root))
            repair_universal_load(acc, root)
        finally:
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(root, ignore_errors=True)


def _short(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
                        raise ValueError(f"frozen parameter {name}: {tuple(value.shape)} vs checkpoint "
                                         f"{tuple(state[name].shape)}")
                    state[name] = value
        acc.wait_for_everyone()
    else:
        state = acc.get_state_dict(model)
        if not acc.is_main_process:
            state = None
    if state is None:
        return None
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
            for k, v in state.items()}


__all__ = [
    "CheckpointManager",
    "CheckpointUnreadable",
    "CheckpointUnsafe",
    "REGISTERED_FILE",
    "CheckpointWriteError",
    "ResumeMismatch",
    "STATE_FILE",
    "complete_checkpoints",
    "move_aside",
    "verify_checkpoint",
    "warn",
    "model_fingerprint",
    "fingerprint_changes",
    "config_changes",
    "export_state_dict",
    "frozen_parameters",
]
