"""Shared helpers for the launcher tests: free ports, tiny pretraining configs, subprocess runs of pretrain/mae.py
(one process, `accelerate launch` with 2 processes, DeepSpeed), and reading metrics.jsonl; for the pre-emption and
launch-file tests: runs started in their own session, a signal sent to the whole process group at a given step,
weights compared bitwise, and reference runs shared between test modules (`shared_run`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from conftest import TINY_MODEL

from launch.metrics import read_metrics as read_metrics_file

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SAMPLE = str(ROOT / "data" / "sample")
ENTRY = str(ROOT / "pretrain" / "mae.py")



def tiny_args(run_dir, *extra: str, steps: int = 6, batch: int = 8, workers: int = 0) -> list[str]:
    """Overrides for a tiny, quiet pretraining run on the shipped sample shards."""
    return [
        *TINY_MODEL,
        f"data.train={SAMPLE}",
        f"data.micro_batch={batch}",
        f"data.num_workers={workers}",
        f"run.output_dir={run_dir}",
        f"run.steps={steps}",
        "run.log_every=1",
        f"run.save_every={steps}",
        "run.trackers=none",
        "run.progress=false",
        "run.precision=no",
        "optim.warmup_steps=2",
        "vis.num_images=2",
        *extra,
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    """Subprocess environment: one thread, the repo importable, no stray launcher settings."""
    stray = ("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "PET_", "TORCHELASTIC_")
    out = {k: v for k, v in os.environ.items() if not k.startswith(stray)}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def launch_two(script: str, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` (python source) under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)."""
    path = tmp / "driver.py"
    # Several entry-point mains share one launched process (saves a launch, ~10 s, each); `end_training` at the end
    # of a main destroys the process group, so the driver keeps it for the next main and tears it down at exit.
    path.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                    "import launch.metrics as _m\n"
                    "_m.MetricsLogger.close = lambda self: [t.finish() for t in self.accelerator.trackers]\n"
                    + script
                    # a clean teardown: exiting with a live gloo group lets one rank abort (SIGABRT) at exit
                    + "\nimport torch.distributed as _dist\nif _dist.is_initialized():\n"
                      "    _dist.barrier()\n    _dist.destroy_process_group()\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def ddp_cmd(args: list[str], port: int) -> list[str]:
    """Two CPU processes (gloo) through the shipped launch/accelerate/cpu_2proc.yaml."""
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
            "--main_process_port", str(port), ENTRY, *args]


def fp32_zero_yaml(stage: int, fp32_dir: Path) -> Path:
    """A copy of launch/accelerate/zero{stage}.yaml naming a copy of its DeepSpeed JSON edited for fp32, the way
    docs/LAUNCH.md says ("edit the JSON for fp32"), by its absolute path (a relative one is looked up in the current
    directory, then in the repository: launch/accel.py)."""
    yaml_file = ROOT / "launch" / "accelerate" / f"zero{stage}.yaml"
    ds = json.loads((ROOT / "launch" / "deepspeed" / f"zero{stage}.json").read_text())
    ds["bf16"] = {"enabled": False}
    (fp32_dir / f"zero{stage}_fp32.json").write_text(json.dumps(ds))
    text = yaml_file.read_text()
    named = f"deepspeed_config_file: launch/deepspeed/zero{stage}.json"  # the yaml's own (repository-relative)
    assert named in text, f"{yaml_file} no longer names its DeepSpeed JSON as {named!r}"
    text = text.replace(named, f"deepspeed_config_file: {fp32_dir / f'zero{stage}_fp32.json'}")
    out = fp32_dir / f"zero{stage}_fp32.yaml"
    out.write_text(text)
    return out


def deepspeed_cmd(args: list[str], port: int, stage: int = 2, nproc: int = 2,
                  fp32_dir: Path | None = None) -> list[str]:
    """`accelerate launch` with the shipped ZeRO yaml as written (bf16 in its DeepSpeed JSON), or, with `fp32_dir`,
    with copies of the yaml and JSON edited for fp32 (`fp32_zero_yaml`): the numerics comparison with DDP needs both
    in fp32."""
    yaml_file = ROOT / "launch" / "accelerate" / f"zero{stage}.yaml"
    if fp32_dir is not None:
        yaml_file = fp32_zero_yaml(stage, fp32_dir)
    return [ACCELERATE, "launch", "--config_file", str(yaml_file), "--num_processes", str(nproc),
            "--main_process_port", str(port), ENTRY, *args]


def run(cmd: list[str], timeout: float = 180, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (the project's reader; a cut-short last line is skipped)."""
    return read_metrics_file(Path(run_dir) / "metrics.jsonl")


def train_rows(run_dir) -> list[dict]:
    """The per-step training records of RUN_DIR/metrics.jsonl (those with a loss; the step-0 row holds the k-NN
    baselines measured before training)."""
    return [r for r in read_metrics(run_dir) if "loss" in r]


def run_record(run_dir) -> dict:
    """RUN_DIR/run.json: what the run says about itself (world size, engine, precision, batch arithmetic, ...)."""
    return json.loads((Path(run_dir) / "run.json").read_text())


def wait_for_step(proc: subprocess.Popen, step: int) -> int:
    """Read the run's plain log lines (`step N/M loss ...`, printed with run.progress=false) from `proc.stdout`
    until one reports `step >= step`; returns that step. Blocks on the pipe, no polling."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return int(line.split()[1].split("/")[0])
    raise AssertionError(f"process ended (rc {proc.wait()}) before step {step}")


# ------------------------------------------------------------------------------------------------------------------
# Pre-emption and launch files (issue 12): process groups, signals, shared reference runs

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# no k-NN monitor and a 2-image grid: what a tiny test run does not need (size overrides, like run.steps)
QUIET = ["run.trackers=none", "run.progress=false", "knn.enabled=false", "vis.num_images=2"]
_SHARED: dict[str, Path] = {}


def shared_run(key: str, make: Callable[[Path], None]) -> Path:
    """`make(run_dir)` once per pytest process for `key`; returns its run directory. Test modules that need the same
    uninterrupted reference run (same command, same world size) share it instead of running it twice."""
    if key not in _SHARED:
        run_dir = Path(tempfile.mkdtemp(prefix=f"tessera-{key}-")) / "run"
        make(run_dir)
        _SHARED[key] = run_dir
    return _SHARED[key]


def start(cmd: list[str], **env_extra: str) -> subprocess.Popen:
    """Start `cmd` in a session (and process group) of its own, stdout and stderr merged into one text pipe."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def read_until_step(proc: subprocess.Popen, step: int) -> tuple[int, list[str]]:
    """Read `proc`'s output until a plain log line `step N/M ...` with N >= step (blocks on the pipe, no polling);
    returns N and the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and "/" in line.split()[1]:
            n = int(line.split()[1].split("/")[0])
            if n >= step:
                return n, lines
    raise AssertionError(f"ended (rc {proc.wait()}) before step {step}:\n" + "".join(lines[-60:]))


def signal_group_at_step(proc: subprocess.Popen, step: int, sig: int, timeout: float = 240) -> tuple[int, str]:
    """When `proc` logs step `step`, send `sig` to its whole process group (as `timeout`, `kill -- -PGID` and
    schedulers do); wait for the output to end (every process holding the pipe gone). Returns (the step seen when
    signalling, all output). The group is SIGKILLed if anything is left of it afterwards."""
    try:
        seen, lines = read_until_step(proc, step)
        os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=timeout)
        return seen, "".join(lines) + rest
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a process group this test started (nothing, normally)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a started run to end by itself; its output. Fails with the output's tail on a non-zero exit."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{out[-6000:]}"
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors, bitwise (`torch.equal`)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{a} and {b} differ in {len(different)} tensors, e.g. {different[:5]}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in RUN_DIR/checkpoints."""
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpt.glob("step_*") if (p / "tessera_state.json").is_file()
                  and p.name[5:].isdigit()) if ckpt.is_dir() else []


# The standard tiny runs of the pre-emption and launch-file tests: a documented command plus these size overrides.
# Uninterrupted references are shared through `shared_run` under the keys below.
PRE_STEPS = 40
CPU_2PROC = str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml")


def pretrain_sizes(run_dir) -> list[str]:
    """Size overrides appended to a documented pretraining command (tiny model, few steps, 1 loader worker)."""
    return [*TINY_MODEL, f"data.train={SAMPLE}", "data.micro_batch=8", "data.num_workers=1",
            f"run.output_dir={run_dir}", f"run.steps={PRE_STEPS}", "run.log_every=1", f"run.save_every={PRE_STEPS}",
            "optim.warmup_steps=2", *QUIET]


def one_process_cmd(run_dir) -> list[str]:
    """README: `python pretrain/mae.py` (+ sizes)."""
    return [PYTHON, ENTRY, *pretrain_sizes(run_dir)]


def two_process_cmd(run_dir, port) -> list[str]:
    """README: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pretrain/mae.py` (+ sizes);
    run it with env ACCELERATE_USE_CPU=1."""
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port), ENTRY,
            *pretrain_sizes(run_dir)]


def pretrain_reference(world: int) -> Path:
    """The uninterrupted tiny pretraining run with 1 or 2 processes (shared)."""
    if world == 1:
        return shared_run("pretrain-1proc", lambda d: finish(start(one_process_cmd(d))))
    return shared_run("pretrain-2proc",
                      lambda d: finish(start(two_process_cmd(d, free_port()), ACCELERATE_USE_CPU="1")))


def downstream_cmd(script: str, run_dir, *extra: str) -> list[str]:
    """README: `python finetune/<script> encoder=runs/pretrain/encoder.safetensors` (+ sizes), the encoder being the
    one-process reference pretraining run's."""
    encoder = pretrain_reference(1) / "encoder.safetensors"
    return [PYTHON, str(ROOT / "finetune" / script), f"encoder={encoder}", f"run.output_dir={run_dir}",
            f"run.steps={PRE_STEPS}", "run.log_every=1", f"run.save_every={PRE_STEPS}", "data.global_batch=8",
            "data.eval_batch=50", "data.num_workers=1", "data.shuffle_buffer=50", "optim.warmup_steps=2",
            "run.trackers=none", "run.progress=false", *extra]


DOWNSTREAM_EXTRA = {"classify.py": ["model.drop_path_rate=0.1"],
                    "linprobe.py": ["probe.cached=false"]}  # the streaming path: loader workers, encoder each step


def downstream_reference(script: str) -> Path:
    return shared_run(f"ref-{script}", lambda d: finish(start(downstream_cmd(script, d, *DOWNSTREAM_EXTRA[script]))))
