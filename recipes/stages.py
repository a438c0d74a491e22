"""Running a recipe's stages: each an entry point (or `data/make_shards.py`) run as a subprocess from the repository
root, its output echoed and logged to `STAGE_DIR/stage.log`, its command, exit code and wall-clock kept in
`STAGE_DIR/stage.json`. A finished stage whose command is unchanged is reused; one interrupted with the same command
keeps its folder, so the entry point resumes from its last checkpoint. Also the recipes' errors, and commands written
for the results page with the machine's folders replaced by names (WORK, CIFAR_DIR, ...)."""

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
RECORD, LOG = "stage.json", "stage.log"


class StageError(RuntimeError):
    """A stage failed; the message names the stage, its exit code and its log."""


class InputError(StageError):
    """The recipe was given something it cannot use (a missing tarball, a folder it must not delete); the message
    names the option to change."""


def run_stage(name: str, cmd: list[str], stage_dir: Path, env: dict[str, str], done_file: Path | None,
              reuse: bool = True) -> dict:
    """Run `cmd` (see the module docstring); returns {"stage", "command", "seconds", "returncode", "reused"}. A stage
    that runs starts from an emptied `stage_dir` (old checkpoints must not be resumed) unless it was interrupted."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    record_path, shown = stage_dir / RECORD, shell_join(cmd)
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
    with open(stage_dir / LOG, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := proc.stdout.read1(65536):  # chunks, not lines, so the children's progress bars still render
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        rc = proc.wait()
    seconds = round(time.perf_counter() - t0, 1)
    record = {"stage": name, "command": shown, "seconds": seconds, "returncode": rc}
    record_path.write_text(json.dumps(record, indent=1))
    if rc != 0:
        tail = (stage_dir / LOG).read_bytes()[-3000:].decode("utf-8", "replace")
        raise StageError(f"stage '{name}' failed with exit code {rc} after {seconds:.0f} s; full log: "
                         f"{stage_dir / LOG}\n--- last lines ---\n{tail}")
    if done_file is not None and not done_file.exists():
        raise StageError(f"stage '{name}' exited 0 but did not write {done_file}; log: {stage_dir / LOG}")
    return {**record, "reused": False}


def shell_join(cmd: list[str]) -> str:
    """The command as one would type it from the repository root (the interpreter shown as `python`)."""
    return shlex.join(["python" if i == 0 and c == sys.executable else c for i, c in enumerate(cmd)])


def public(text: str, folders: dict[str, Path]) -> str:
    """`text` with each folder's path written as its name (e.g. WORK) and the repository's own prefix dropped, so a
    recorded command names no folder of the machine it ran on."""
    for label, folder in folders.items():
        text = text.replace(str(folder), label)
    return text.replace(f"{REPO}/", "")


def public_argv(argv: list[str], options: dict[str, str]) -> list[str]:
    """`argv` with the values of the path `options` (e.g. {"--work": "WORK"}) replaced by their names."""
    out = []
    for i, arg in enumerate(argv):
        key = arg.split("=", 1)[0]
        if "=" in arg and key in options:
            arg = f"{key}={options[key]}"
        elif i and argv[i - 1] in options:
            arg = options[argv[i - 1]]
        out.append(arg)
    return out


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

