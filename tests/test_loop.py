"""The training loop on its own (`launch/loop.py`), in-process on a toy model: hook cadence (plain and merged into the
step's record, at the end), checkpoint cadence (`save_every`, the last step), the stop flag at a step boundary, the
non-finite policy (`max_nonfinite`), gradient accumulation against one big batch, and the log record's fields."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from launch.loop import Hook, NonFiniteLossError, TrainLoop
from launch.sections import OptimConfig, RunConfig


class ToySession:
    """What the loop uses of a session: the accelerator, config, batch arithmetic, checkpoints and the log."""

    def __init__(self, run: RunConfig, optim: OptimConfig, global_batch: int):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=optim.grad_accum_steps)
        self.rt = SimpleNamespace(accelerator=acc, global_batch=global_batch, accum=optim.grad_accum_steps)
        self.cfg = SimpleNamespace(run=run, optim=optim)
        self.start_step, self.loop_state, self.stop = 0, {}, None
        self.saved, self.records = [], []

    def save(self, step: int, loop_state: dict):
        self.saved.append(step)
        return f"checkpoint-{step}"

    def log(self, step: int, values: dict) -> None:
        self.records.append({"step": step, **values})


def toy(steps=6, accum=1, lr=0.1, **run_kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    run = RunConfig(output_dir="unused", steps=steps, log_every=run_kw.pop("log_every", 2), progress=False,
                    trackers=("none",), **run_kw)
    optim = OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0, grad_accum_steps=accum)
    session = ToySession(run, optim, global_batch=4 * accum)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt = session.rt.accelerator.prepare(model, opt)
    return session, model, opt


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 1, generator=g)}


def mse(model):
    return lambda b: torch.nn.functional.mse_loss(model(b["x"]), b["y"])


def test_hook_and_save_cadence_and_the_log_record():
    session, model, opt = toy(steps=7, save_every=3, eval_every=0)
    calls = {"plain": [], "merged": []}
    hooks = [Hook(3, lambda s: calls["plain"].append(s) or {"plain": 1.0}, at_end=True),
             Hook(2, lambda s: calls["merged"].append(s) or {"merged": float(s)}, merge=True)]
    out = TrainLoop(session, model, opt, mse(model), batches(), 0.1, hooks=hooks, flops_per_image=10.0).fit()
    assert out.step == 7 and out.stopped_by is None and out.checkpoint == "checkpoint-7"
    assert calls == {"plain": [3, 6, 7], "merged": [2, 4, 6]}
    assert session.saved == [3, 6, 7]
    logged = {r["step"]: r for r in session.records if "loss" in r}
    assert sorted(logged) == [2, 4, 6, 7]  # log_every 2, and the last step
    assert logged[4]["merged"] == 4.0 and "merged" not in logged[7]  # merged values ride in their step's record
    assert all(r["lr"] == pytest.approx(0.1) and 0 <= r["data_wait"] <= 1 and r["images_per_sec"] > 0 and
               r["tflops"] == pytest.approx(r["images_per_sec"] * 10.0 / 1e12) for r in logged.values())
    assert [r["step"] for r in session.records if "plain" in r] == [3, 6, 7]  # plain hooks: records of their own


def test_stop_flag_ends_at_the_step_boundary_with_a_checkpoint():
    session, model, opt = toy(steps=10, save_every=0)
    seen = []

    def step(b):
        seen.append(1)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3
        return mse(model)(b)

    out = TrainLoop(session, model, opt, step, batches(), 0.1).fit()
    assert out.stopped_by == "SIGTERM" and out.step == 3 and session.saved == [3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the loop


def test_non_finite_losses_skip_updates_then_stop_the_run():
    session, model, opt = toy(steps=10, max_nonfinite=3, log_every=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        TrainLoop(session, model, opt, lambda b: mse(model)(b) * float("nan"), batches(), 0.1).fit()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # every update was skipped
    assert [r["n_nonfinite"] for r in session.records] == [1, 2, 3] and all(r["loss"] is None
                                                                          for r in session.records)


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 accumulated = one step on their 8 samples (mean loss): the same weights."""
    session, model, opt = toy(steps=3, accum=2)
    TrainLoop(session, model, opt, mse(model), batches(), 0.1).fit()
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    micro = batches()
    for _ in range(3):
        a, b = next(micro), next(micro)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(torch.cat([a["x"], b["x"]])), torch.cat([a["y"], b["y"]])).backward()
        ref_opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-7)
