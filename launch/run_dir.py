"""One run per run directory: a lock naming its holder, and no fresh start on top of another run's checkpoints.

    claim = claim_run_dir(cfg.run.output_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)  # main process
    try:
        ...train...
    finally:
        claim.release()
    # or: with claim_run_dir(...) as claim: ...

Lock: `RUN_DIR/run.lock`, a small JSON file (host, pid, process start time, wall-clock start, command line)
created atomically (written to a private file, then hard-linked into place: `link` fails if the name exists, also on
NFS). A second run into the same directory fails at once with a `RunDirLocked` error naming the holder. A lock whose
holder is gone is taken over with a note: on the same host when the pid is not running (or is another process than
the one recorded, pid reuse), on another host when its heartbeat (the lock's mtime, touched every
`HEARTBEAT_SECONDS` by a daemon thread) is older than `STALE_SECONDS`, measured with the file system's own clock.
The lock is removed by `release()` (also at interpreter exit); a killed run leaves a stale lock, taken over as above.

Fresh start: with `resume=False`, a directory holding complete checkpoints is refused (`RunDirHasCheckpoints`) unless
`overwrite=True`; then `checkpoints/` and `metrics.jsonl` are moved to `RUN_DIR/replaced-<UTC time>/` before the new
run writes anything (nothing is deleted). A leftover `metrics.jsonl` with no checkpoint to resume (a run killed before
its first save) is moved there too, so the new run's metrics are one series.

The lock is advisory and taken by the main process only; the other ranks rely on it. Written by hand: no well-kept
library offers a lock that names its holder and survives NFS (filelock's `FileLock` uses flock, which NFS and Lustre
may not honour and which cannot say who holds it).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.errors import UserError
from launch.checkpoint import complete_checkpoints, move_aside, utc_stamp

LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.jsonl"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # a lock from another host whose heartbeat is older than this is taken over


class RunDirLocked(UserError):
    """Another live run holds the run directory."""


class RunDirHasCheckpoints(UserError):
    """A fresh start (`run.resume=false`) into a directory holding another run's checkpoints, without `overwrite`."""


@dataclass
class Holder:
    host: str
    pid: int
    started: str  # UTC wall-clock time the lock was taken
    create_time: float | None  # the process's start time (psutil), to tell a reused pid apart
    command: str
    token: str

    @classmethod
    def me(cls) -> Holder:
        try:
            created = psutil.Process().create_time()
        except psutil.Error:
            created = None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        return cls(host=socket.gethostname(), pid=os.getpid(), started=started, create_time=created,
                   command=command, token=uuid.uuid4().hex)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started} ({self.command})"

    def running_here(self) -> bool:
        """On this host: is the recorded process still alive (same pid and start time)?"""
        try:
            proc = psutil.Process(self.pid)
            return self.create_time is None or abs(proc.create_time() - self.create_time) < 1.0
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # exists, but we may not inspect it: assume it is the holder
            return True


def _read_holder(lock: Path) -> Holder | None:
    try:
        data = json.loads(lock.read_text())
        return Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__})
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError):
        return None


def _fs_now(folder: Path) -> float:
    """The file system's clock (mtime of a fresh file): a heartbeat written by another host compares against it."""
    probe = folder / f".clock-{uuid.uuid4().hex}"
    try:
        probe.touch()
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _is_stale(lock: Path, holder: Holder | None) -> bool:
    if holder is not None and holder.host == socket.gethostname():
        return not holder.running_here()
    age = _fs_now(lock.parent) - lock.stat().st_mtime
    return age > STALE_SECONDS


@dataclass
class RunDirClaim:
    """The lock on a run directory (and what was moved aside for a fresh start); `release()` frees the lock."""

    run_dir: Path
    lock: Path
    holder: Holder
    replaced: Path | None = None  # where checkpoints/metrics of an earlier run were moved, if anywhere
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.lock)
            except OSError:
                print(f"WARNING: the run-directory lock {self.lock} disappeared; another run may now use "
                      f"{self.run_dir}", file=sys.stderr, flush=True)
                return

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Safe to call twice."""
        self._stop.set()
        try:
            current = _read_holder(self.lock)
        except FileNotFoundError:
            return
        if current is not None and current.token == self.holder.token:
            self.lock.unlink(missing_ok=True)

    def __enter__(self) -> RunDirClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _take_lock(run_dir: Path) -> RunDirClaim:
    lock = run_dir / LOCK_NAME
    me = Holder.me()
    private = run_dir / f".{LOCK_NAME}.{me.token}"
    private.write_text(json.dumps(me.__dict__, indent=1) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(private, lock)
                return RunDirClaim(run_dir=run_dir, lock=lock, holder=me)
            except FileExistsError:
                pass
            try:
                holder = _read_holder(lock)
                stale = _is_stale(lock, holder)
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if not stale:
                who = holder.describe() if holder else "a run whose lock file is unreadable"
                raise RunDirLocked(
                    f"run directory {run_dir} is in use by another run: {who}. Wait for it to finish or stop it, or "
                    f"choose another run.output_dir. If that process no longer exists (e.g. its node died), delete "
                    f"{lock}")
            try:  # move the stale lock away (atomic: only one of several takers succeeds), then retry the link
                os.replace(lock, run_dir / f".{LOCK_NAME}.stale-{me.token}")
            except FileNotFoundError:
                continue
            (run_dir / f".{LOCK_NAME}.stale-{me.token}").unlink(missing_ok=True)
            print(f"note: taking over the lock of {run_dir} from a run that is no longer running "
                  f"({holder.describe() if holder else 'unreadable lock file'})", file=sys.stderr, flush=True)
        raise RunDirLocked(f"could not lock run directory {run_dir}: {lock} keeps changing; is another run starting?")
    finally:
        private.unlink(missing_ok=True)


def claim_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False,
                  heartbeat: bool = True) -> RunDirClaim:
    """Lock `run_dir` for this run (creating it) and make way for a fresh start. Call on the main process before
    writing anything into the directory; release the claim at the end (or use it as a context manager).

    Raises `RunDirLocked` (another live run holds it, named) or `RunDirHasCheckpoints` (`resume=False` over existing
    checkpoints without `overwrite`); the lock is not kept then. With `resume=False, overwrite=True` the earlier run's
    `checkpoints/` and `metrics.jsonl` go to `run_dir/replaced-<time>/` (`claim.replaced`).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.output_dir={run_dir} is a file, not a folder; choose another run.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = _take_lock(run_dir)
    try:
        done = complete_checkpoints(run_dir / "checkpoints")
        metrics = run_dir / METRICS_NAME
        if not resume and done:
            if not overwrite:
                raise RunDirHasCheckpoints(
                    f"run directory {run_dir} holds {len(done)} checkpoint(s) of an earlier run (newest: "
                    f"{done[-1][1].name}) and run.resume=false starts a new run there. Resume it instead "
                    f"(run.resume=true), choose another run.output_dir, or add run.overwrite=true to move the old "
                    f"checkpoints and metrics aside (to {run_dir}/replaced-<time>/)")
            moved = [run_dir / "checkpoints"] + ([metrics] if metrics.exists() else [])
            claim.replaced = move_aside(run_dir, moved, utc_stamp())
            print(f"note: run.overwrite=true: moved the earlier run's checkpoints and metrics to {claim.replaced}",
                  file=sys.stderr, flush=True)
        elif not done and metrics.exists() and metrics.stat().st_size > 0:
            claim.replaced = move_aside(run_dir, [metrics], utc_stamp())
            print(f"note: {metrics} of an earlier run that saved no checkpoint was moved to {claim.replaced}",
                  file=sys.stderr, flush=True)
    except BaseException:
        claim.release()
        raise
    if heartbeat:
        claim.start_heartbeat()
    atexit.register(claim.release)
    return claim


__all__ = ["claim_run_dir", "RunDirClaim", "RunDirLocked", "RunDirHasCheckpoints", "Holder", "LOCK_NAME",
           "HEARTBEAT_SECONDS", "STALE_SECONDS"]
