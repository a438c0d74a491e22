"""Stop on N processes, continue on M (issue 23), as users do it: docs/LAUNCH.md's "Re-run on any number of
processes" commands, stopped by SIGTERM to the launcher's process group at a step boundary (as a scheduler does),
re-run with another `--num_processes`. For DDP (4 -> 2 and 2 -> 3), ZeRO-2 (4 -> 2), ZeRO-3 (2 -> 3), FSDP2 (4 -> 2)
and fine-tuning (4 -> 2), on CPU (gloo), in fp32 (`run.precision=no`; the ZeRO yamls with their JSON edited for fp32
as LAUNCH.md says), each resumed run must

* say at start-up which step it resumes, on how many processes it was saved and how many it has now, and record both
  world sizes in run.json's segments;
* read the same samples in every step as the uninterrupted run (`data.log_samples=true`: RUN_DIR/samples.jsonl);
* end with weights equal to the uninterrupted run's up to fp32 rounding (`WEIGHT_RTOL`, see there).

A change of `data.num_workers` alone (same process count) must end bitwise equal. The uninterrupted references are
DDP runs (4 processes, global batch 32; 2 processes, global batch 12) shared between the tests (`shared_run`): ZeRO
and FSDP2 in fp32 compute what DDP computes, summed in another order (test_pretrain_distributed.py compares them), so
each engine's resumed run is held to the same reference and tolerance. The fast tests at the end check the batch
split, the random-stream policy and the DCP safety checks in-process.
"""

from __future__ import annotations

import pickle
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL
from helpers_launch import (
    QUIET,
    SAMPLE,
    checkpoint_steps,
    finish,
    fp32_zero_yaml,
    free_port,
    read_metrics,
    run_record,
    shared_run,
    signal_group_at_step,
    start,
)
from safetensors.torch import load_file
from test_launch_files import argv, documented

from launch.sample_log import read_samples

STEPS = 12
STOP_AT = 3  # SIGTERM once the run logs this step; it saves at the next step boundary and stops
# The tolerance on the final weights, relative per tensor: ||resumed - uninterrupted|| <= WEIGHT_RTOL x ||uninterrupted
# - initial|| (Frobenius norms), i.e. against how far training moved the tensor. Why: a resumed run on M processes
# sums each step's gradient over another split of the same samples (per-rank micro-batch sums, all-reduce or
# reduce-scatter over M ranks, accumulation), so each gradient differs from the uninterrupted run's by fp32 rounding
# only, a relative ~1e-7 (2^-24 per addition, over a few dozen partial sums); AdamW's update m/(sqrt(v)+eps) passes a
# relative gradient error through at about its size, so the displacement differs by ~1e-7..1e-6 of itself over 12
# steps; 1e-4 leaves a margin of 100. One part is left out: the key bias (the middle third of each attn.qkv.bias). The
# loss does not depend on it (softmax over the keys of a query ignores a constant added to every key), so its
# gradient is pure rounding noise, which AdamW normalises into steps whose sign follows the summation order: it moves
# 1e-4..3e-3 as far as the query and value biases, and two summation orders differ by up to 30% of that. Measured
# (docs/LAUNCH.md): every other tensor within 7e-7..4e-6 (pretraining) and 8e-6 (fine-tuning); the same DDP 4 -> 2
# resume with the AdamW moments zeroed ends 0.57 away.
WEIGHT_RTOL = 1e-4
ELASTIC = r"^accelerate launch --config_file launch/accelerate/{yaml}\.yaml --num_processes 4 {script}"


def elastic_cmd(yaml: str, processes: int, run_dir: Path, *sizes: str, script: str = "pretrain/mae.py",
                fp32_dir: Path | None = None) -> tuple[list[str], dict]:
    """docs/LAUNCH.md's re-run command for `yaml` with `--num_processes processes`, size overrides appended; for a
    ZeRO yaml, `fp32_dir` holds its fp32 copy (helpers_launch.fp32_zero_yaml)."""
    (command,) = documented(ELASTIC.format(yaml=yaml, script=re.escape(script)))
    command = command.replace("--num_processes 4", f"--num_processes {processes}")
    if yaml.startswith("zero"):
        command = command.replace(f"launch/accelerate/{yaml}.yaml", str(fp32_zero_yaml(int(yaml[-1]), fp32_dir)))
    return argv(command, launcher_sizes=["--main_process_port", str(free_port())], program_sizes=list(sizes))


def pretrain_sizes(run_dir: Path, micro: int, workers: int = 1) -> list[str]:
    """A 12-step tiny fp32 MAE run that logs its samples (size overrides appended to the documented command)."""
    return [*TINY_MODEL, f"data.train={SAMPLE}", f"data.micro_batch={micro}", f"data.num_workers={workers}",
            f"run.output_dir={run_dir}", f"run.steps={STEPS}", "run.log_every=1", f"run.save_every={STEPS}",
            "optim.warmup_steps=2", "optim.blr=0.01", "run.precision=no", "data.log_samples=true", *QUIET]


def reference(world: int) -> Path:
    """The uninterrupted DDP run: 4 processes x micro 8 (global 32), or 2 processes x micro 6 (global 12)."""
    micro = {4: 8, 2: 6}[world]

    def make(run_dir: Path) -> None:
        cmd, extra = elastic_cmd("ddp8", world, run_dir, *pretrain_sizes(run_dir, micro))
        finish(start(cmd, **extra), timeout=600)
        initial_weights(run_dir)

    return shared_run(f"elastic-ddp{world}", make)


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights every run starts from (built from run.seed, as the entry point builds them)."""
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.mae import build_model

    args = pretrain_sizes(run_dir, 8)
    torch.manual_seed(0)  # run.seed: start_run seeds every rank with it before the model is built
    return {k: v.float() for k, v in build_model(load_config(PretrainConfig, args)).state_dict().items()}


def stop(cmd_env: tuple[list[str], dict], run_dir: Path) -> int:
    """Start a documented command, SIGTERM its process group when it logs step STOP_AT; the step it saved."""
    cmd, extra = cmd_env
    proc = start(cmd, **extra)
    seen, out = signal_group_at_step(proc, STOP_AT, signal.SIGTERM)
    assert "stopped by SIGTERM" in out, out[-4000:]
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and seen <= steps[0] < STEPS, (steps, seen, out[-3000:])
    return steps[0]


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` without the key bias when `name` is an attention's qkv bias ([q | k | v], see WEIGHT_RTOL)."""
    if name.endswith("attn.qkv.bias"):
        d = t.numel() // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


def displacement_error(got: Path, want: Path, initial: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of ||got - want|| / ||want - initial|| (the worst tensor's name too); key biases left out."""
    a, b = load_file(str(got)), load_file(str(want))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    a = {k: without_key_bias(k, v) for k, v in a.items()}
    b = {k: without_key_bias(k, v) for k, v in b.items()}
    initial = {k: without_key_bias(k, v) for k, v in initial.items()}
    worst, name = 0.0, ""
    for k in b:
        moved = (b[k] - initial[k]).norm().item()
        if moved == 0:  # frozen (the sin-cos tables): must be identical
            assert torch.equal(a[k], b[k]), k
            continue
        err = (a[k] - b[k]).norm().item() / moved
        if err > worst:
            worst, name = err, k
    return worst, name


def batch_split(run_dir: Path) -> tuple[int, int, int, int]:
    """(micro-batch, processes, accumulation, global batch) of the run's latest start (run.json)."""
    r = run_record(run_dir)
    return r["micro_batch"], r["world_size"], r["grad_accum_steps"], r["global_batch"]


def engine(run_dir: Path) -> tuple[str, int, int | None]:
    """(distributed type, world size, ZeRO stage) of the run's latest start (run.json)."""
    r = run_record(run_dir)
    return r["distributed_type"], r["world_size"], r["zero_stage"]


def check_resumed(run_dir: Path, ref: Path, out: str, stopped: int, saved_on: int, now_on: int,
                  weights: str = "mae.safetensors", initial: dict | None = None) -> float:
    """The resumed run's start-up line, run.json segments, samples per step and final weights (see the module
    docstring); returns the measured weight error."""
    line = f"resuming step {stopped} of a run saved on {saved_on} processes, now on {now_on}"
    assert line in out, out[-4000:]
    record = run_record(run_dir)
    assert [(s["world_size"], s["start_step"]) for s in record["segments"]] == [(saved_on, 0), (now_on, stopped)]
    assert record["global_batch"] == run_record(ref)["global_batch"]
    got, want = read_samples(run_dir), read_samples(ref)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert got == want, [s for s in want if got.get(s) != want[s]]
    err, name = displacement_error(run_dir / weights, ref / weights, initial or initial_weights(ref))
    print(f"{run_dir}: {saved_on} -> {now_on} processes, weight error {err:.2e} ({name})")
    assert err <= WEIGHT_RTOL, f"{name}: {err:.3e}"
    return err


# ------------------------------------------------------------------------------------------------------ DDP


@pytest.mark.slow
def test_ddp_four_to_two(tmp_path):
    """DDP, global batch 32: 4 processes x micro 8, stopped, continued on 2 processes (micro 8 x accumulation 2)."""
    ref, run_dir = reference(4), tmp_path / "run"
    stopped = stop(elastic_cmd("ddp8", 4, run_dir, *pretrain_sizes(run_dir, 8)), run_dir)
    cmd, extra = elastic_cmd("ddp8", 2, run_dir, *pretrain_sizes(run_dir, 8))
    out = finish(start(cmd, **extra), timeout=600)
    assert batch_split(run_dir) == (8, 2, 2, 32)  # micro x processes x accumulation = the saved global batch
    check_resumed(run_dir, ref, out, stopped, 4, 2)


@pytest.mark.slow
def test_ddp_two_to_three(tmp_path):
    """DDP, global batch 12: 2 processes x micro 6, stopped, continued on 3 processes (micro 4)."""
    ref, run_dir = reference(2), tmp_path / "run"
    stopped = stop(elastic_cmd("ddp8", 2, run_dir, *pretrain_sizes(run_dir, 6)), run_dir)
    cmd, extra = elastic_cmd("ddp8", 3, run_dir, *pretrain_sizes(run_dir, 6))
    out = finish(start(cmd, **extra), timeout=600)
    assert batch_split(run_dir) == (4, 3, 1, 12)
    check_resumed(run_dir, ref, out, stopped, 2, 3)


@pytest.mark.slow
def test_num_workers_change_alone_is_bitwise(tmp_path):
    """The same 2 processes, `data.num_workers` 1 -> 2 across the stop: every RNG state comes back and the stream does
    not depend on the worker count, so the run ends bitwise equal to the uninterrupted one."""
    ref, run_dir = reference(2), tmp_path / "run"
    stopped = stop(elastic_cmd("ddp8", 2, run_dir, *pretrain_sizes(run_dir, 6, workers=1)), run_dir)
    cmd, extra = elastic_cmd("ddp8", 2, run_dir, *pretrain_sizes(run_dir, 6, workers=2))
    finish(start(cmd, **extra), timeout=600)
    segments = run_record(run_dir)["segments"]
    assert [(s["world_size"], s["start_step"]) for s in segments] == [(2, 0), (2, stopped)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["num_workers"] == 2  # the resumed run's
    assert read_samples(run_dir) == read_samples(ref)
    a, b = load_file(str(run_dir / "mae.safetensors")), load_file(str(ref / "mae.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_refuses_a_global_batch_the_processes_do_not_divide(tmp_path):
    """In-process (no launch): a checkpoint with a global batch of 32 met by 3 processes is refused in one line that
    names the run, the numbers and the process counts that work."""
    from launch.checkpoint import ResumeMismatch
    from launch.elastic import plan_batch

    saved = {"global_batch": 32, "micro_batch": 8, "world_size": 4, "grad_accum_steps": 1,
             "_path": str(tmp_path / "checkpoints" / "step_000004")}
    with pytest.raises(ResumeMismatch) as err:
        plan_batch(saved, 3, 8, None, 1)
    msg = str(err.value)
    assert "\n" not in msg and "global batch of 32" in msg and "3 processes" in msg and "(1, 2, 4, 8, 16, 32)" in msg


# ------------------------------------------------------------------------------------------------ ZeRO, FSDP2


@pytest.mark.slow
def test_zero2_four_to_two(tmp_path):
    """ZeRO-2 (fp32): 4 processes stopped, 2 continue through DeepSpeed's universal checkpoint."""
    ref, run_dir = reference(4), tmp_path / "run"
    stopped = stop(elastic_cmd("zero2", 4, run_dir, *pretrain_sizes(run_dir, 8), fp32_dir=tmp_path), run_dir)
    cmd, extra = elastic_cmd("zero2", 2, run_dir, *pretrain_sizes(run_dir, 8), fp32_dir=tmp_path)
    out = finish(start(cmd, **extra), timeout=600)
    assert engine(run_dir) == ("DEEPSPEED", 2, 2)
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the conversion is removed after loading
    check_resumed(run_dir, ref, out, stopped, 4, 2)


@pytest.mark.slow
def test_zero3_two_to_three(tmp_path):
    """ZeRO-3 (fp32): 2 processes stopped, 3 continue (global batch 12: micro 4)."""
    ref, run_dir = reference(2), tmp_path / "run"
    stopped = stop(elastic_cmd("zero3", 2, run_dir, *pretrain_sizes(run_dir, 6), fp32_dir=tmp_path), run_dir)
    cmd, extra = elastic_cmd("zero3", 3, run_dir, *pretrain_sizes(run_dir, 6), fp32_dir=tmp_path)
    out = finish(start(cmd, **extra), timeout=600)
    assert engine(run_dir) == ("DEEPSPEED", 3, 3)
    check_resumed(run_dir, ref, out, stopped, 2, 3)


@pytest.mark.slow
def test_fsdp2_four_to_two(tmp_path):
    """FSDP2 (fp32): 4 processes stopped, 2 continue; the DCP checkpoint reshards on load."""
    ref, run_dir = reference(4), tmp_path / "run"
    stopped = stop(elastic_cmd("fsdp2", 4, run_dir, *pretrain_sizes(run_dir, 8)), run_dir)
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    # the k-NN monitor on in the continued run (knn.* may change on resume; it draws nothing from the training
    # streams): under FSDP2 it runs the encoder alone, which needs the root shard unit gathered (launch/knn_monitor.py)
    cmd, extra = elastic_cmd("fsdp2", 2, run_dir, *pretrain_sizes(run_dir, 8), "knn.enabled=true",
                             f"run.eval_every={STEPS}")
    out = finish(start(cmd, **extra), timeout=600)
    assert engine(run_dir) == ("FSDP", 2, None)
    assert 0 <= read_metrics(run_dir)[-1]["knn_top1"] <= 1
    units = run_record(run_dir)["fsdp"]["units"]
    assert {"", "encoder.blocks.0", "encoder.blocks.1", "decoder_blocks.0"} <= set(units), units  # one per Block
    check_resumed(run_dir, ref, out, stopped, 4, 2)


# ------------------------------------------------------------------------------------------------ fine-tuning


def finetune_sizes(run_dir: Path) -> list[str]:
    """A 12-step fine-tuning run from the 4-process reference's encoder; model-side per-rank randomness off (drop
    path, mixup/cutmix, random erasing: new draws after a change of process count, docs/LAUNCH.md), so the result is
    comparable; RandAugment stays on (per sample)."""
    return [f"run.output_dir={run_dir}", f"run.steps={STEPS}", "run.log_every=1", f"run.save_every={STEPS}",
            "data.micro_batch=8", "data.eval_batch=100", "data.num_workers=1", "data.shuffle_buffer=50",
            "data.log_samples=true", "optim.warmup_steps=2", "run.precision=no", "model.drop_path_rate=0",
            "aug.mixup=0", "aug.cutmix=0", "aug.reprob=0", "run.trackers=none", "run.progress=false"]


@pytest.mark.slow
def test_finetune_four_to_two(tmp_path):
    encoder = reference(4) / "encoder.safetensors"

    def cmd(processes: int, run_dir: Path):
        command, extra = elastic_cmd("ddp8", processes, run_dir, *finetune_sizes(run_dir),
                                     script="finetune/classify.py")
        return [w.replace("runs/pretrain/encoder.safetensors", str(encoder)) for w in command], extra

    ref = tmp_path / "ref"
    command, extra = cmd(4, ref)
    finish(start(command, **extra), timeout=600)
    run_dir = tmp_path / "run"
    stopped = stop(cmd(4, run_dir), run_dir)
    command, extra = cmd(2, run_dir)
    out = finish(start(command, **extra), timeout=600)
    check_resumed(run_dir, ref, out, stopped, 4, 2, weights="classifier_last.safetensors",
                  initial=finetune_initial(ref))


def finetune_initial(ref: Path) -> dict[str, torch.Tensor]:
    """The classifier's weights before training, built as finetune/classify.py builds them (seeded with run.seed)."""
    from finetune.classify import build_classifier
    from finetune.config import FinetuneConfig
    from finetune.downstream import resolve_downstream
    from launch.config import load_config

    cfg = load_config(FinetuneConfig, [f"encoder={reference(4) / 'encoder.safetensors'}", *finetune_sizes(ref)])
    torch.manual_seed(cfg.run.seed)
    model, _, _ = build_classifier(resolve_downstream(cfg), cfg)
    return {k: v.float() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ in-process


def test_batch_plan():
    """The config's split when it makes the saved global batch; otherwise the largest micro-batch up to the config's
    (else the saved one) that divides the per-process share, the accumulation making up the rest."""
    from launch.elastic import plan_batch

    def split(plan):
        return plan.micro, plan.accum, plan.global_batch

    saved = {"global_batch": 32, "micro_batch": 8, "world_size": 4, "grad_accum_steps": 1}
    assert split(plan_batch(None, 2, 8, None, 1)) == (8, 1, 16)  # fresh run: the config's
    assert split(plan_batch(saved, 4, 8, None, 1)) == (8, 1, 32)  # same world: the config's, no note
    assert plan_batch(saved, 4, 8, None, 1).note is None
    two = plan_batch(saved, 2, 8, None, 1)
    assert split(two) == (8, 2, 32) and "micro 8 x 2 processes x 2 accumulation" in two.note
    assert split(plan_batch(saved, 2, 4, None, 4)) == (4, 4, 32)  # the user's own split for 2 processes
    assert split(plan_batch(saved, 8, 8, None, 1)) == (4, 1, 32)  # more processes: smaller micro-batch
    assert split(plan_batch(saved, 2, 3, None, 1)) == (2, 8, 32)  # at most 3 per micro-step: 2 divides 16
    assert split(plan_batch({"global_batch": 36, "world_size": 2}, 4, None, 36, 1)) == (9, 1, 36)  # no saved micro


def test_rng_restart_is_per_rank_and_deterministic():
    from launch.elastic import reseed_ranks

    draws = {}
    for rank in (0, 1, 0):
        reseed_ranks(0, 5, rank)
        draws.setdefault(rank, []).append(torch.rand(3))
    assert torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0], draws[1][0])


def _dcp(tmp_path: Path) -> Path:
    """A real distributed checkpoint (one process), with tensors and a non-tensor item, as FSDP2 writes them."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.arange(6.0).view(2, 3), "extra": {"lr": 0.5, "betas": (0.9, 0.95)}}, checkpoint_id=str(folder))
    return folder


def test_dcp_checkpoint_passes_the_safety_and_corruption_checks(tmp_path):
    from launch.checkpoint import verify_checkpoint
    from launch.safe_load import unsafe_file

    folder = _dcp(tmp_path)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert {p.name for p in files} >= {".metadata"} and any(p.suffix == ".distcp" for p in files)
    assert [unsafe_file(p) for p in files] == [None] * len(files)
    (tmp_path / "tessera_state.json").write_text("{}")
    assert verify_checkpoint(tmp_path) is None


def test_dcp_metadata_that_runs_code_is_refused(tmp_path):
    from launch.safe_load import unsafe_file

    folder = _dcp(tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(_CallsCode(), protocol=4))
    why = unsafe_file(folder / ".metadata")
    assert why is not None and "getcwd" in why


class _CallsCode:
    """Pickles as a call of os.getcwd (harmless, but a call: what a planted checkpoint file would do)."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_dcp_item_that_runs_code_is_refused(tmp_path):
    """A non-tensor item (DCP itself unpickles those with weights_only=False) that calls code when loaded."""
    import torch.distributed.checkpoint as dcp

    from launch.safe_load import unsafe_file

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.zeros(2), "extra": _CallsCode()}, checkpoint_id=str(folder))
    why = unsafe_file(folder / ".metadata")
    assert why is not None and "getcwd" in why and ".distcp" in why


def test_truncated_dcp_file_is_named(tmp_path):
    from launch.checkpoint import verify_checkpoint

    folder = _dcp(tmp_path / "step")
    (tmp_path / "step" / "tessera_state.json").write_text("{}")
    data = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-10])
    problem = verify_checkpoint(tmp_path / "step")
    assert problem is not None and data.name in problem and "truncated" in problem
