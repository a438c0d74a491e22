"""CheckpointManager on one CPU process: atomic step-named saves, keep-last-K, stale temporaries, exact restore of
weights/optimizer/RNG, refusal of a checkpoint whose model shapes differ; MetricsLogger truncation on resume."""

import json

import pytest
import torch
from accelerate import Accelerator

from launch.checkpoint import STATE_FILE, CheckpointManager, ResumeMismatch, model_fingerprint
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


def test_changed_model_shape_is_refused_with_names(tmp_path):
    acc, model, opt = make(width=4)
    mgr = CheckpointManager(acc, tmp_path)
    mgr.save(1, {"fingerprint": model_fingerprint(model), "config": {"model": {"width": 4}}})
    acc2, model2, _ = make(width=6)
    with pytest.raises(ResumeMismatch) as err:
        CheckpointManager(acc2, tmp_path).load_latest(model_fingerprint(model2), config={"model": {"width": 6}})
    msg = str(err.value)
    assert "0.weight: checkpoint [4, 3] vs model [6, 3]" in msg
    assert "model.width: 4 -> 6" in msg


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
