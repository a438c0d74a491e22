"""No host-device sync in steady-state training steps, for pretraining, fine-tuning (DeiT distillation included) and
probing (issue: one loop).

Each run goes through its real entry point (`main([...])`) under a TorchDispatchMode that records every op that makes
the host wait for the device (`aten._local_scalar_dense`, behind `.item()`, `bool(t)`, `int(t)`; `aten.item`;
`aten.is_nonzero`; `aten.equal`; a copy to the CPU from another device). Counting is on only while the steps
2 .. N-1 run (none of them a log, save or evaluation step) and off while the loader produces the next batch (data
work, not the device). A NaN is injected into one steady-state step's input: the update is skipped on the device,
counted (`n_nonfinite` = 1 at the next log step) and costs no sync either.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOWNSTREAM
from helpers_launch import tiny_args
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}
STEPS, NAN_STEP = 6, 3


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.active = False
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = (func is aten._to_copy.default and str(kwargs.get("device", "")) == "cpu"
                   and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu")
        if self.active and (func in SYNC_OPS or to_host):
            self.calls.append(str(func))
        return func(*args, **kwargs)


def windowed(make_iter, counter: SyncCounter, accum: int, key: str):
    """Wrap a batch-iterator factory: count only during steps 2 .. STEPS-1, poison step NAN_STEP's input with NaN."""

    def factory(*args, **kwargs):
        inner = iter(make_iter(*args, **kwargs))
        n = 0
        while True:
            counter.active = False  # the loader's own work is not the device's
            batch = next(inner)
            n += 1
            step = (n - 1) // accum + 1
            if step == NAN_STEP:
                batch = {**batch, key: batch[key] * float("nan")}
            counter.active = 2 <= step <= STEPS - 1
            yield batch

    return factory


def only_train(real, counter, accum, key, train_type):
    """Apply `windowed` to the training loader only (evaluation and picture loaders pass through)."""
    wrapped = windowed(real, counter, accum, key)

    def pick(loader, *args, **kwargs):
        return wrapped(loader, *args, **kwargs) if isinstance(loader, train_type) else real(loader, *args, **kwargs)

    return pick


def last_metrics(run_dir) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r][-1]


def check(counter, run_dir):
    assert counter.calls == [], f"host syncs in steady-state steps: {counter.calls}"
    record = last_metrics(run_dir)
    assert record["step"] == STEPS and record["n_nonfinite"] == 1  # the poisoned step was skipped and counted
    assert record["loss"] is not None and record["loss"] == record["loss"]  # the kept steps' mean stays finite


CADENCE = [f"run.steps={STEPS}", f"run.log_every={STEPS}", "run.save_every=0"]


def test_pretraining_steps_do_not_sync(tmp_path, monkeypatch):
    from data.train_stream import TrainLoader
    from pretrain import mae

    counter = SyncCounter()
    monkeypatch.setattr(mae, "device_batches", only_train(mae.device_batches, counter, 2, "image", TrainLoader))
    args = tiny_args(tmp_path, "optim.grad_accum_steps=2", steps=STEPS) + CADENCE
    with counter:
        mae.main(args)
    check(counter, tmp_path)


@pytest.mark.parametrize("objective", [
    ["model.objective=simmim"],
    ["model.objective=simmim", "model.target=hog"],
    ["model.objective=mae", "model.target=hog"],
    ["model.objective=data2vec", "data2vec.top_k=2"],  # the teacher's targets and its EMA update (after_update)
], ids=["simmim", "simmim-hog", "mae-hog", "data2vec"])
def test_objective_steps_do_not_sync(tmp_path, monkeypatch, objective):
    """The other pretraining objectives (models/objectives.py): block masks, mask tokens, HOG, the EMA teacher."""
    from data.train_stream import TrainLoader
    from pretrain import mae

    counter = SyncCounter()
    monkeypatch.setattr(mae, "device_batches", only_train(mae.device_batches, counter, 2, "image", TrainLoader))
    args = tiny_args(tmp_path, "optim.grad_accum_steps=2", steps=STEPS) + CADENCE + objective
    if objective[0] != "model.objective=mae":  # no decoder: drop the tiny MAE decoder's overrides
        args = [a for a in args if not a.startswith("model.overrides.decoder_")]
    with counter:
        mae.main(args)
    check(counter, tmp_path)


def test_finetuning_steps_do_not_sync(tiny, tmp_path, monkeypatch):
    from data.train_stream import TrainLoader
    from finetune import classify, downstream

    counter = SyncCounter()
    monkeypatch.setattr(downstream, "device_batches", only_train(downstream.device_batches, counter, 1, "image",
                                                                 TrainLoader))
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tmp_path}",
            "run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8",
            "data.eval_batch=4", "run.eval_every=0", "optim.warmup_steps=1", "optim.clip_grad=1.0", *CADENCE]
    with counter:
        classify.main(args)
    check(counter, tmp_path)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distillation_steps_do_not_sync(tiny, tmp_path, monkeypatch, kind):
    """DeiT distillation: a frozen timm CNN teacher on the same mixed images, renormalised to its own mean/std."""
    import timm
    from safetensors.torch import save_file

    from data.train_stream import TrainLoader
    from finetune import classify, downstream

    teacher_file = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(teacher_file))
    counter = SyncCounter()
    monkeypatch.setattr(downstream, "device_batches", only_train(downstream.device_batches, counter, 1, "image",
                                                                 TrainLoader))
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tmp_path / 'run'}",
            "run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8",
            "data.eval_batch=4", "run.eval_every=0", "optim.warmup_steps=1", "optim.clip_grad=1.0",
            f"distill.kind={kind}", "distill.teacher=timm:test_resnet", f"distill.teacher_weights={teacher_file}",
            "distill.teacher_mean=[0.5,0.5,0.5]", "distill.teacher_std=[0.25,0.25,0.25]", "distill.tau=2.0", *CADENCE]
    with counter:
        classify.main(args)
    check(counter, tmp_path / "run")
    assert last_metrics(tmp_path / "run")["loss_distill"] >= 0  # the distillation head's loss, logged


@pytest.mark.parametrize("cached", [True, False])
def test_probing_steps_do_not_sync(tiny, tmp_path, monkeypatch, cached):
    from data.train_stream import TrainLoader
    from finetune import downstream, linprobe

    counter = SyncCounter()
    if cached:
        monkeypatch.setattr(linprobe, "cached_batches", windowed(linprobe.cached_batches, counter, 1, "feature"))
    else:
        monkeypatch.setattr(downstream, "device_batches", only_train(downstream.device_batches, counter, 1, "image",
                                                                     TrainLoader))
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tmp_path}",
            f"probe.cached={str(cached).lower()}", *DOWNSTREAM, *CADENCE]
    with counter:
        linprobe.main(args)
    check(counter, tmp_path)
