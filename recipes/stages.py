"""Running a recipe's stages: each a subprocess from the repository root, logged (STAGE_DIR/stage.log) and recorded
(STAGE_DIR/stage.json); the recipes' errors; commands as the page shows them (the machine's folders named)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A stage failed; the message names the stage, its exit code and its log."""


class InputError(StageError):
    """The recipe cannot use what it was given (a missing tarball, ...); the message names the option to change."""


def run_stage(name: str, cmd: list[str], stage_dir: Path, env: dict[str, str], done_file: Path | None,
              reuse: bool = True) -> dict:
    """Run `cmd` unless it finished before with the same command (and `reuse`); a rerun starts from an emptied
    `stage_dir`, except after an interruption with the same command, which resumes from its last checkpoint."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    record_path, log_path, shown = stage_dir / "stage.json", stage_dir / "stage.log", shell_join(cmd)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        same = record.get("command") == shown
        complete = record.get("returncode") == 0 and (done_file is None or done_file.exists())
        if same and complete and reuse:
            print(f"[recipe] {name}: reusing {stage_dir} ({record['seconds']:.0f} s when it ran)", flush=True)
            return {**record, "reused": True}
        if not same or complete:  # another command, or a finished stage to redo: no resuming from its checkpoints
            shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
    record_path.write_text(json.dumps({"stage": name, "command": shown, "returncode": None}))  # started
    print(f"[recipe] {name}: {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := proc.stdout.read1(65536):  # chunks, not lines, so the children's progress bars still render
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
    record = {"stage": name, "command": shown, "seconds": round(time.perf_counter() - t0, 1),
              "returncode": proc.wait()}
    record_path.write_text(json.dumps(record, indent=1))
    if record["returncode"] != 0:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise StageError(f"stage '{name}' failed with exit code {record['returncode']} after {record['seconds']:.0f} "
                         f"s; full log: {log_path}\n--- last lines ---\n{tail}")
    if done_file is not None and not done_file.exists():
        raise StageError(f"stage '{name}' exited 0 but did not write {done_file}; log: {log_path}")
    return {**record, "reused": False}


def shell_join(cmd: list[str]) -> str:
    """The command as one would type it from the repository root (the interpreter shown as `python`)."""
    return shlex.join(["python" if i == 0 and c == sys.executable else c for i, c in enumerate(cmd)])


def public(text: str, folders: dict[str, Path]) -> str:
    """`text` with each folder's path written as its name (e.g. WORK) and the repository's own prefix dropped, so a
    recorded command names no folder of the machine it ran on."""
    # longest path first, so that a file beside a folder (c.tar.gz beside c) keeps its own name
    for label, folder in sorted(folders.items(), key=lambda item: -len(str(item[1]))):
        text = text.replace(str(folder), label)
    return text.replace(f"{REPO}/", "")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
