"""launch/run_dir.py (issue 12, items 4 and 5): the run-directory lock names its holder and refuses a second run at
once; a stale lock (dead process on this host, old heartbeat from another host) is taken over; a fresh start over
another run's checkpoints is refused unless `overwrite`, which moves them aside before anything is written.
The holders are real processes (subprocesses that claim the directory and wait on their stdin)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers_launch import ROOT, env

from launch.run_dir import LOCK_NAME, STALE_SECONDS, RunDirHasCheckpoints, RunDirLocked, claim_run_dir

HOLDER = r"""
import sys
from launch.run_dir import claim_run_dir
claim = claim_run_dir(sys.argv[1], resume=True)
print("claimed", flush=True)
sys.stdin.readline()
claim.release()
"""


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, env=env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "claimed", proc.stderr.read()
    return proc


def test_second_run_fails_at_once_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as err:
            claim_run_dir(tmp_path, resume=True)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "started" in msg
        assert str(tmp_path) in msg and "run.output_dir" in msg
    finally:
        holder.stdin.close()  # the holder releases and exits
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_NAME).exists()
    with claim_run_dir(tmp_path, resume=True) as claim:  # free again
        assert json.loads(claim.lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no chance to release: the lock file stays
    holder.wait(timeout=30)
    holder.stdin.close()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    claim = claim_run_dir(tmp_path, resume=True, heartbeat=False)
    try:
        assert json.loads(claim.lock.read_text())["pid"] == os.getpid()
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        claim.release()


def _foreign_lock(run_dir, age_seconds):
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps({"host": "some-other-node", "pid": 1, "started": "2026-01-01 00:00:00 UTC",
                                "create_time": 0.0, "command": "mae.py", "token": "x"}))
    old = time.time() - age_seconds
    os.utime(lock, (old, old))
    return lock


def test_lock_from_another_host_is_respected_while_its_heartbeat_is_fresh(tmp_path):
    _foreign_lock(tmp_path, age_seconds=5)
    with pytest.raises(RunDirLocked, match="some-other-node"):
        claim_run_dir(tmp_path, resume=True)


def test_lock_from_another_host_with_an_old_heartbeat_is_taken_over(tmp_path):
    _foreign_lock(tmp_path, age_seconds=STALE_SECONDS + 60)
    with claim_run_dir(tmp_path, resume=True, heartbeat=False) as claim:
        assert json.loads(claim.lock.read_text())["host"] == socket.gethostname()


def _old_run(run_dir, steps=(100, 200)):
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "tessera_state.json").write_text(json.dumps({"step": step}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def test_fresh_start_over_checkpoints_is_refused_and_the_lock_not_kept(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(RunDirHasCheckpoints) as err:
        claim_run_dir(tmp_path, resume=False)
    msg = str(err.value)
    assert "step_000200" in msg and "run.overwrite=true" in msg and "run.resume=true" in msg
    assert not (tmp_path / LOCK_NAME).exists()
    assert (tmp_path / "checkpoints" / "step_000200").is_dir()  # nothing touched
    with claim_run_dir(tmp_path, resume=True, heartbeat=False):  # resuming the old run is fine
        assert (tmp_path / "checkpoints" / "step_000200").is_dir()


def test_overwrite_moves_the_old_run_aside_before_the_new_one_writes(tmp_path):
    _old_run(tmp_path)
    with claim_run_dir(tmp_path, resume=False, overwrite=True, heartbeat=False) as claim:
        assert claim.replaced is not None and claim.replaced.parent == tmp_path
        assert claim.replaced.name.startswith("replaced-")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
        assert json.loads((claim.replaced / "checkpoints/step_000200/tessera_state.json").read_text())["step"] == 200
        assert len((claim.replaced / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_of_a_run_that_never_saved_are_moved_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with claim_run_dir(tmp_path, resume=True, heartbeat=False) as claim:
        assert not (tmp_path / "metrics.jsonl").exists()
        assert (claim.replaced / "metrics.jsonl").exists()



@pytest.mark.slow
def test_entry_point_end_to_end(tmp_path):
    """Items 4 and 5 through `python pretrain/mae.py`: a second run into a running run's directory stops at once
    (exit 2, the holder named); after the first is stopped, `run.resume=false` over its checkpoints is refused;
    `run.overwrite=true` moves them aside before the first save, and the directory then holds only the new run's."""
    from helpers_launch import ENTRY, PYTHON, finish, read_metrics, read_until_step, start, tiny_args

    run_dir = tmp_path / "run"
    first = start([PYTHON, ENTRY, *tiny_args(run_dir, "knn.enabled=false", steps=2000)])
    try:
        read_until_step(first, 1)
        second = subprocess.run([PYTHON, ENTRY, *tiny_args(run_dir, "knn.enabled=false", steps=3)], cwd=ROOT,
                                env=env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        out = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert "stopped by SIGTERM" in out and not (run_dir / LOCK_NAME).exists()
    old = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))

    fresh = [PYTHON, ENTRY, *tiny_args(run_dir, "knn.enabled=false", "run.resume=false", steps=3)]
    refused = subprocess.run(fresh, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "run.overwrite=true" in refused.stderr and old[-1] in refused.stderr
    finish(start([*fresh, "run.overwrite=true"]))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000003"]
    (replaced,) = run_dir.glob("replaced-*")
    assert sorted(p.name for p in (replaced / "checkpoints").glob("step_*")) == old
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]  # the new run's series only
