"""Real multi-process runs of pretrain/mae.py on CPU (gloo), from the shipped sample shards:
2-process DDP, DeepSpeed ZeRO-2 (fp32, equal losses), ZeRO-3 bf16 export, and kill -9 at a random step + restart
ending bitwise equal to an uninterrupted run. Every launch file and documented command as written (the multi-node
form included): tests/test_launch_files.py."""

import os
import random
import signal
import subprocess

import pytest
import torch
from helpers_launch import (
    ENTRY,
    PYTHON,
    ROOT,
    ddp_cmd,
    deepspeed_cmd,
    env,
    free_port,
    read_metrics,
    run,
    run_record,
    tiny_args,
    train_rows,
    wait_for_step,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # multi-process launches, DeepSpeed, SLURM, pre-emption

STEPS = 6
ACCUM = ["optim.grad_accum_steps=2", "data.micro_batch=4"]  # 2 micro-steps of 4 images per rank and step
# DDP and ZeRO-2 run the same fp32 math with the same data and masks; they differ only in how gradients are reduced
# (DDP all-reduce buckets vs ZeRO reduce-scatter into partitions), i.e. in float rounding.
LOSS_RTOL = 1e-4


def losses(run_dir):
    return [r["loss"] for r in train_rows(run_dir)]


def assert_finished(run_dir, steps=STEPS):
    assert (run_dir / "checkpoints" / f"step_{steps:06d}" / "tessera_state.json").exists()
    enc = load_file(run_dir / "encoder.safetensors")
    assert "cls_token" in enc and "blocks.1.attn.qkv.weight" in enc and not any(k.startswith("decoder") for k in enc)
    assert all(v.dtype == torch.float32 for v in enc.values())
    return enc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    run(ddp_cmd(tiny_args(run_dir, *ACCUM, steps=STEPS), free_port()))
    rec = run_record(run_dir)
    assert (rec["distributed_type"], rec["world_size"]) == ("MULTI_CPU", 2)
    return run_dir


def test_ddp_two_processes(ddp_run):
    enc = assert_finished(ddp_run)
    assert enc["pos_embed"].shape == (1, 17, 32)  # full shape: 16 patches + cls, width 32
    assert len(losses(ddp_run)) == STEPS
    assert read_metrics(ddp_run)[-1]["batches"] == 2 * STEPS  # two micro-batches per optimizer step


def test_zero2_matches_ddp(ddp_run, tmp_path):
    run_dir = tmp_path / "run"
    run(deepspeed_cmd(tiny_args(run_dir, *ACCUM, steps=STEPS), free_port(), stage=2, fp32_dir=tmp_path))
    rec = run_record(run_dir)
    assert (rec["distributed_type"], rec["world_size"], rec["zero_stage"]) == ("DEEPSPEED", 2, 2)
    assert (rec["micro_batch"], rec["grad_accum_steps"], rec["global_batch"]) == (4, 2, 16)
    enc = assert_finished(run_dir)
    ref = losses(ddp_run)
    got = losses(run_dir)
    assert got == pytest.approx(ref, rel=LOSS_RTOL)
    ddp_enc = load_file(ddp_run / "encoder.safetensors")
    for k, v in ddp_enc.items():
        assert enc[k].shape == v.shape
        torch.testing.assert_close(enc[k], v, rtol=1e-4, atol=1e-5)


def test_sigkill_and_resume_is_bitwise_equal(tmp_path):
    steps = 12
    extra = ["run.save_every=2", "run.keep_checkpoints=2"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run([PYTHON, ENTRY, *tiny_args(ref_dir, *extra, steps=steps, workers=1)])

    kill_at = random.Random().randint(3, 9)
    cmd = [PYTHON, ENTRY, *tiny_args(cut_dir, *extra, steps=steps, workers=1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = wait_for_step(proc, kill_at)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut_dir / "encoder.safetensors").exists()
    resumed = run(cmd)
    assert "resuming at step" in resumed.stdout, f"killed at step >= {seen}, but the restart did not resume"

    ref, got = load_file(ref_dir / "mae.safetensors"), load_file(cut_dir / "mae.safetensors")
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"killed at step >= {seen}: tensors differ from the uninterrupted run: {different}"
    # the metrics file is one clean series: the steps after the checkpoint were logged again, once
    assert [r["step"] for r in train_rows(cut_dir)] == list(range(1, steps + 1))
    assert [r["loss"] for r in train_rows(cut_dir)] == [r["loss"] for r in train_rows(ref_dir)]


def test_zero3_bf16_exports_full_precision_full_shape(tmp_path):
    args = [a if a != "run.precision=no" else "run.precision=auto" for a in tiny_args(tmp_path, steps=3)]
    run(deepspeed_cmd(args, free_port(), stage=3))  # zero3.yaml as written: bf16 in its DeepSpeed JSON
    rec = run_record(tmp_path)
    assert (rec["precision"], rec["zero_stage"]) == ("bf16", 3)
    assert_finished(tmp_path, steps=3)
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.mae import build_model

    shapes = {k: tuple(v.shape) for k, v in build_model(load_config(PretrainConfig, args)).state_dict().items()}
    full = load_file(tmp_path / "mae.safetensors")
    assert {k: tuple(v.shape) for k, v in full.items()} == shapes  # consolidated, not ZeRO-3 partitions
    assert all(v.dtype == torch.float32 for v in full.values())
    # the fp32 master weights, not the bf16 compute copy: trained matrices hold values bf16 cannot represent
    w = full["encoder.blocks.0.attn.qkv.weight"]
    assert (w - w.bfloat16().float()).abs().max() > 0
    # frozen sin-cos tables are exported in fp32 (DeepSpeed stores them only in bf16)
    fresh = build_model(load_config(PretrainConfig, args)).state_dict()
    assert torch.equal(full["encoder.pos_embed"], fresh["encoder.pos_embed"])
    assert torch.equal(full["decoder_pos_embed"], fresh["decoder_pos_embed"])
