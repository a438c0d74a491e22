"""A fake SLURM for the tests: `srun`, `scontrol` and an `sbatch`-like runner of launch/slurm/pretrain.sbatch.

`fake_slurm(tmp)` writes executable `srun` and `scontrol` into `tmp/bin` (put it first on PATH):
* `srun [options] CMD ...` starts CMD once per node (`SLURM_NNODES`), each task in its own session with
  `SLURM_NODEID`/`SLURM_PROCID` set, as slurmstepd does. A signal srun receives (TERM, USR1, USR2, INT, HUP, QUIT)
  is forwarded to every process of the job step (the tasks and all their descendants: SLURM's cgroup process
  tracking signals them all, launcher, ranks and DataLoader workers alike). Exit code: the first non-zero task exit
  code, else 0; with `--kill-on-bad-exit=1` a task failing kills the others, as srun does.
* `scontrol show hostnames LIST` prints 127.0.0.1 (one line per node); `scontrol requeue ID` appends
  `requeue ID` to `tmp/scontrol.log` (what the tests check).
`sbatch_env(...)` is the environment a batch job would see (SLURM_JOB_ID, SLURM_NNODES, SLURM_JOB_NODELIST,
SLURM_SUBMIT_DIR) plus the fake bin directory first on PATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRUN = r'''#!{python}
"""Fake srun (tests/helpers_slurm.py): one task per node, signals forwarded to every process of the step."""
import os, signal, subprocess, sys, time

import psutil

args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
kill_on_bad_exit = "--kill-on-bad-exit=1" in opts or "--kill-on-bad-exit" in opts
nodes = int(os.environ.get("SLURM_NNODES", "1"))
tasks = []
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_STEP_ID="0", SLURMD_NODENAME="127.0.0.1")
    tasks.append(subprocess.Popen(args, env=env, start_new_session=True))


def step_processes():
    procs = []
    for t in tasks:
        try:
            p = psutil.Process(t.pid)
            procs += [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return procs


def forward(signum, frame):
    for p in step_processes():
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, forward)

rc = 0
while any(t.poll() is None for t in tasks):
    bad = [t.returncode for t in tasks if t.returncode not in (None, 0)]
    if bad and kill_on_bad_exit:
        rc = rc or bad[0]
        for p in step_processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    try:
        tasks[[t.poll() is None for t in tasks].index(True)].wait(timeout=0.2)
    except subprocess.TimeoutExpired:
        pass
for t in tasks:
    if t.returncode:
        rc = rc or (t.returncode if t.returncode > 0 else 128 - t.returncode)
sys.exit(rc)
'''

SCONTROL = r'''#!{python}
"""Fake scontrol (tests/helpers_slurm.py): `show hostnames`, `requeue` (logged)."""
import os, sys

args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    print("\n".join(["127.0.0.1"] * int(os.environ.get("SLURM_NNODES", "1"))))
elif args[:1] == ["requeue"]:
    with open({log!r}, "a") as fh:
        fh.write("requeue " + " ".join(args[1:]) + "\n")
else:
    sys.exit(f"fake scontrol: unsupported arguments {{args}}")
'''


def fake_slurm(tmp: Path) -> Path:
    """Write fake `srun` and `scontrol` into `tmp/bin`; returns that directory."""
    bin_dir = Path(tmp) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN.format(python=sys.executable)),
                       ("scontrol", SCONTROL.format(python=sys.executable, log=str(Path(tmp) / "scontrol.log")))):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def requeues(tmp: Path) -> list[str]:
    """Lines the fake `scontrol requeue` logged."""
    log = Path(tmp) / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def sbatch_env(tmp: Path, submit_dir: Path, *, nodes: int = 1, job_id: str = "4242", **extra: str) -> dict:
    """What the batch script sees: SLURM variables, the fake commands first on PATH."""
    bin_dir = fake_slurm(tmp)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_JOB_ID": job_id,
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[001-{nodes:03d}]",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        **extra,
    }
