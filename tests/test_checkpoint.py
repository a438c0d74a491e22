"""CheckpointManager on one CPU process: atomic step-named saves, keep-last-K, stale temporaries, exact restore of
weights/optimizer/RNG, refusal of a checkpoint whose model shapes differ; MetricsLogger truncation on resume."""

import json

import pytest
import torch
from accelerate import Accelerator

from launch.checkpoint import (
    STATE_FILE,
    CheckpointManager,
    CheckpointUnsafe,
    config_changes,
    fingerprint_changes,
    model_fingerprint,
)
from launch.metrics import MetricsLogger, read_metrics


def make(width=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def train_step(model, opt):
    loss = model(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_keeps_last_k_and_ignores_incomplete(tmp_path):
    acc, model, opt = make()
    mgr = CheckpointManager(acc, tmp_path, keep=2)
    for step in (1, 2, 3):
        train_step(model, opt)
        mgr.save(step, {"batches": step * 10})
    assert [s for s, _ in mgr.complete()] == [2, 3]
    assert json.loads((tmp_path / "checkpoints/step_000003" / STATE_FILE).read_text())["batches"] == 30
    # a save killed midway leaves a .tmp dir; a directory without the state file is incomplete: both ignored
    (tmp_path / "checkpoints/.tmp-step_000004").mkdir()
    (tmp_path / "checkpoints/step_000005").mkdir()
    assert mgr.latest().name == "step_000003"
    state = mgr.load_latest()
    assert state["step"] == 3 and state["batches"] == 30
    assert not (tmp_path / "checkpoints/.tmp-step_000004").exists()  # stale temporary cleaned


def test_load_restores_weights_optimizer_and_rng(tmp_path):
    acc, model, opt = make()
    mgr = CheckpointManager(acc, tmp_path, keep=1)
    train_step(model, opt)
    mgr.save(1, {"batches": 1})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    after_save = torch.rand(4)
    train_step(model, opt)  # move away from the saved state
    train_step(model, opt)
    assert not torch.equal(model.state_dict()["0.weight"], weights["0.weight"])
    mgr.load_latest()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(opt.state[p]["exp_avg"], e) for p, e in zip(model.parameters(), exp_avg))
    assert torch.equal(torch.rand(4), after_save)  # torch RNG restored to the moment of the save


def test_changed_model_shape_and_config_are_named():
    _, model, _ = make(width=4)
    _, model2, _ = make(width=6)
    assert "0.weight: checkpoint [4, 3] vs model [6, 3]" in fingerprint_changes(model_fingerprint(model),
                                                                                 model_fingerprint(model2))
    assert config_changes({"model": {"width": 4}, "run": {"steps": 3}},
                          {"model": {"width": 6}, "run": {"steps": 3}}) == ["model.width: 4 -> 6"]


def test_keep_must_be_positive(tmp_path):
    acc, _, _ = make()
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(acc, tmp_path, keep=0)


def test_metrics_log_and_truncate(tmp_path):
    acc = Accelerator(cpu=True)
    log = MetricsLogger(tmp_path, acc)
    for step in (1, 2, 3, 4):
        log.log(step, {"loss": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # a line cut short by a kill
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["loss"] == 0.5


# ------------------------------------------------------------------------------ issue 12: items 4, 6, 8, 10


def test_rotation_never_deletes_the_checkpoint_just_saved(tmp_path, capsys):
    """A new run saving step 2 into a directory that still holds another run's step 100-300 checkpoints: the new
    checkpoint stays, the higher-step ones are moved aside (not deleted) so a restart resumes the new run."""
    acc, model, opt = make()
    old = CheckpointManager(acc, tmp_path, keep=2)
    for step in (100, 200, 300):
        old.save(step, {"run": "old"})
    new = CheckpointManager(acc, tmp_path, keep=2)
    saved = new.save(2, {"run": "new"})
    assert saved.name == "step_000002" and (saved / STATE_FILE).exists()
    assert [s for s, _ in new.complete()] == [2]
    assert new.load_latest()["run"] == "new"
    moved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("replaced-*/checkpoints/step_*"))
    assert [m.split("/", 1)[1] for m in moved] == ["checkpoints/step_000200", "checkpoints/step_000300"]
    assert "step_000300" in capsys.readouterr().err
    new.save(3, {"run": "new"})
    new.save(4, {"run": "new"})
    assert [s for s, _ in new.complete()] == [3, 4]  # ordinary keep-last-2 rotation within the run


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", STATE_FILE])
def test_corrupt_latest_falls_back_to_previous_with_one_warning(tmp_path, capsys, victim):
    acc, model, opt = make()
    mgr = CheckpointManager(acc, tmp_path, keep=3)
    train_step(model, opt)
    mgr.save(1, {"batches": 1})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt)
    mgr.save(2, {"batches": 2})
    _truncate(tmp_path / "checkpoints" / "step_000002" / victim)
    train_step(model, opt)
    state = mgr.load_latest()
    assert state["step"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, err
    assert "step_000002" in warnings[0] and victim in warnings[0] and "step_000001" in warnings[0]
    assert (tmp_path / "checkpoints" / "step_000002.corrupt").is_dir()  # kept for inspection, out of the way
    assert mgr.latest().name == "step_000001"


def test_rng_file_carrying_code_refuses_the_resume(tmp_path):
    """A random_states file that references code: nothing of the checkpoint is loaded, the resume is refused in one
    line naming the file (Accelerate alone would skip that file with an info-level log line)."""
    import os

    acc, model, opt = make()
    mgr = CheckpointManager(acc, tmp_path, keep=1)
    train_step(model, opt)
    mgr.save(1, {"batches": 1})
    rng_file = tmp_path / "checkpoints" / "step_000001" / "random_states_0.pkl"
    torch.save({"random_state": os.getcwd}, rng_file)  # a reference to a function: code, not data
    train_step(model, opt)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointUnsafe) as err:
        mgr.load_latest()
    assert "random_states_0.pkl" in str(err.value) and "posix.getcwd" in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in moved.items())  # nothing was loaded


def test_metrics_are_strict_json(tmp_path):
    acc = Accelerator(cpu=True)
    log = MetricsLogger(tmp_path, acc)
    log.log(1, {"loss": float("nan"), "lr": 1e-3, "gnorm": float("inf"), "nested": {"x": float("-inf")}})
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    record = json.loads(line, parse_constant=refuse)  # NaN/Infinity are not JSON
    assert record == {"step": 1, "loss": None, "lr": 1e-3, "gnorm": None, "nested": {"x": None}}


DISK_FULL_SNIPPET = r"""
import json, sys
import torch
from accelerate import Accelerator
from launch.checkpoint import CheckpointManager, CheckpointWriteError, verify_checkpoint

run_dir = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)  # ~260 kB of weights, ~780 kB per checkpoint with the AdamW moments
opt = torch.optim.AdamW(model.parameters())
acc = Accelerator(cpu=True)
model, opt = acc.prepare(model, opt)
model(torch.randn(2, 256)).sum().backward()
opt.step()
mgr = CheckpointManager(acc, run_dir, keep=2)
mgr.save(1, {})
out = {"first": verify_checkpoint(mgr.path_for(1))}
try:
    mgr.save(2, {})
    out["error"] = None
except CheckpointWriteError as exc:
    out["error"] = str(exc)
import os
out["left"] = sorted(os.listdir(mgr.dir))
out["first_after"] = verify_checkpoint(mgr.path_for(1))
print("RESULT " + json.dumps(out))
"""


def _mount_namespace_prefix(tmp_path):
    """`unshare` arguments that let a child mount a tmpfs (root: -m; otherwise a user namespace: -rm), or None."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        ok = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                            capture_output=True).returncode == 0
        if ok:
            return prefix
    return None


def test_disk_full_during_save_is_named_and_previous_checkpoint_intact(tmp_path):
    """A real full disk: the run directory is a 1.2 MB tmpfs (in a private mount namespace), one checkpoint fits,
    the second runs out of space. The error says the disk is full and names the path; the partial checkpoint is
    removed; the previous one still verifies."""
    import subprocess
    import sys

    from helpers_launch import ROOT, env

    prefix = _mount_namespace_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (no unshare / mount namespaces)")
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SNIPPET)
    cmd = [*prefix, "sh", "-c", 'mount -t tmpfs -o size=1200k tmpfs "$1" && exec "$2" "$3" "$1"', "sh",
           str(run_dir), sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["first"] is None
    assert out["error"] is not None and "the disk is full" in out["error"]
    assert str(run_dir / "checkpoints") in out["error"] and "step_000001 is intact" in out["error"]
    assert out["left"] == ["step_000001"]  # no .tmp-step_000002 left behind
    assert out["first_after"] is None
