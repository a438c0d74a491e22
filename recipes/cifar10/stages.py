"""Running the chain's stages: each an entry point run as a subprocess from the repository root, its output echoed and
logged, its command and wall-clock recorded in `chain_stage.json`, and a finished stage reused when its command is
unchanged. Also the errors the chain raises and the small shared helpers (`shell_join`, `now_iso`)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ChainError(RuntimeError):
    """A stage of the chain failed; the message names the stage, its exit code and its log."""


class ChainInputError(ChainError):
    """The chain was given something it cannot use (a missing tarball, a folder it must not delete); the message says
    which option to change."""


def run_stage(name: str, cmd: list[str], stage_dir: Path, env: dict[str, str], done_file: Path | None,
              reuse: bool = True) -> dict:
    """Run `cmd` from the repository root, echo and log its output, and record the command and wall-clock.

    With `reuse`, a stage whose `done_file` exists and whose recorded command is the same is not run again. A stage
    that is run starts from an emptied `stage_dir` (old checkpoints must not be resumed), except one that was
    interrupted with the same command: that keeps its folder, so the entry point resumes from its last checkpoint."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    record_path = stage_dir / "chain_stage.json"
    shown = shell_join(cmd)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        same = record.get("command") == shown
        complete = record.get("returncode") == 0 and (done_file is None or done_file.exists())
        if same and complete and reuse:
            print(f"[chain] {name}: reusing {done_file} ({record['seconds']:.0f} s when it ran)", flush=True)
            return {**record, "reused": True}
        if not same or complete:  # another command, or a finished stage to redo: no resuming from its checkpoints
            print(f"[chain] {name}: starting afresh in {stage_dir}", flush=True)
            shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
    record_path.write_text(json.dumps({"stage": name, "command": shown, "returncode": None}))  # started
    print(f"[chain] {name}: {shown}", flush=True)
    log_path = stage_dir / "chain_stage.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):  # chunks, not lines, so the children's tqdm bars still render
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    record = {"stage": name, "command": shown, "seconds": round(seconds, 1), "returncode": rc,
              "finished": now_iso(), "log": str(log_path)}
    record_path.write_text(json.dumps(record, indent=1))
    if rc != 0:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise ChainError(f"stage '{name}' failed with exit code {rc} after {seconds:.0f} s; full log: {log_path}\n"
                         f"--- last lines ---\n{tail}")
    if done_file is not None and not done_file.exists():
        raise ChainError(f"stage '{name}' exited 0 but did not write {done_file}; log: {log_path}")
    print(f"[chain] {name}: done in {seconds:.0f} s", flush=True)
    return {**record, "reused": False}


def shell_join(cmd: list[str]) -> str:
    """The command as one would type it from the repository root (the interpreter shown as `python`)."""
    parts = ["python" if i == 0 and c == sys.executable else c for i, c in enumerate(cmd)]
    return shlex.join(parts)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
