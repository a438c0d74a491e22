"""Pre-emption as schedulers deliver it (issue 12, item 2): SIGTERM or SIGUSR1 sent to the whole PROCESS GROUP
(`os.killpg`, what `timeout`, `kill -- -PGID`, SLURM and torchelastic do), with DataLoader workers running
(`data.num_workers=1`), through each documented way of launching: the trainer itself (one process), `accelerate
launch` with two processes, torchrun, and the SLURM script (fake `srun`/`scontrol`). Each stopped run must have saved
a checkpoint at a step boundary before its last step and exited as documented (docs/LAUNCH.md: the trainer and the
SLURM script (after `scontrol requeue` on SIGUSR1) 0; torch's launcher non-zero after forwarding, with a code that
depends on its version, so only "non-zero" is asserted); re-running the same command must
end with weights bitwise equal (`torch.equal`) to an uninterrupted run's. The same for fine-tuning and probing.

Every run is started in its own session; the signal is sent when its plain log shows step 2 (read from the pipe,
no sleeping). Both signals are covered across the cases (SIGTERM: two-process accelerate launch, fine-tuning;
SIGUSR1: one process, torchrun, SLURM, probing). The uninterrupted references are the README commands' runs, shared
with tests/test_launch_files.py (`helpers_launch.shared_run`)."""

from __future__ import annotations

import signal

import pytest
from helpers_launch import (
    ACCELERATE,
    CPU_2PROC,
    DOWNSTREAM_EXTRA,
    ENTRY,
    PRE_STEPS,
    ROOT,
    TORCHRUN,
    assert_same_weights,
    checkpoint_steps,
    downstream_cmd,
    downstream_reference,
    finish,
    free_port,
    one_process_cmd,
    pretrain_reference,
    pretrain_sizes,
    read_metrics,
    signal_group_at_step,
    start,
)
from helpers_slurm import requeues, sbatch_env

pytestmark = pytest.mark.slow  # multi-process launches, DeepSpeed, SLURM, pre-emption

SIGNAL_AT = 2  # the run has PRE_STEPS - 2 steps left to stop in
TORCHELASTIC_STOP = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}  # docs/LAUNCH.md


def check_stopped(run_dir, out: str, seen: int, sig: int, rc: int, zero: bool) -> int:
    """The stopped run: exit status (0, or any non-zero code for a launcher whose code depends on its version), our
    message, one checkpoint at a step boundary in [seen, PRE_STEPS) (so the ranks and their loader workers survived
    the signal long enough to save it); its step."""
    assert (rc == 0) == zero, f"exit code {rc}, expected {'0' if zero else 'non-zero'}:\n{out[-5000:]}"
    assert f"stopped by {signal.Signals(sig).name}" in out, out[-5000:]
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and seen <= steps[0] < PRE_STEPS, (steps, seen, out[-3000:])
    return steps[0]


def check_resumed(run_dir, reference, out: str, stopped_at: int, weights: str = "mae.safetensors") -> None:
    assert f"resuming at step {stopped_at}" in out or f"resumed at step {stopped_at}" in out, out[-3000:]
    assert_same_weights(run_dir / weights, reference / weights)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, PRE_STEPS + 1))


def test_one_process_trainer_sigusr1(tmp_path):
    """`python pretrain/mae.py`: the documented one-process form under a scheduler; exit 0."""
    ref = pretrain_reference(1)
    run_dir = tmp_path / "run"
    proc = start(one_process_cmd(run_dir))
    seen, out = signal_group_at_step(proc, SIGNAL_AT, signal.SIGUSR1)
    at = check_stopped(run_dir, out, seen, signal.SIGUSR1, proc.returncode, zero=True)
    check_resumed(run_dir, ref, finish(start(one_process_cmd(run_dir))), at)


def test_accelerate_launch_two_processes_sigterm(tmp_path):
    """`accelerate launch --config_file launch/accelerate/cpu_2proc.yaml` (2 ranks): torch's launcher forwards
    SIGTERM to each rank's group; the ranks checkpoint and exit 0; the launcher exits non-zero."""
    ref = pretrain_reference(2)
    run_dir = tmp_path / "run"

    def cmd():
        return [ACCELERATE, "launch", "--config_file", CPU_2PROC, "--main_process_port", str(free_port()), ENTRY,
                *pretrain_sizes(run_dir)]

    proc = start(cmd())
    seen, out = signal_group_at_step(proc, SIGNAL_AT, signal.SIGTERM)
    at = check_stopped(run_dir, out, seen, signal.SIGTERM, proc.returncode, zero=False)
    check_resumed(run_dir, ref, finish(start(cmd())), at)


def test_torchrun_two_processes_sigusr1(tmp_path):
    """`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pretrain/mae.py` with SIGUSR1 in PET_SIGNALS_TO_HANDLE
    (what torch's launcher reads): forwarded like SIGTERM; the launcher exits non-zero."""
    ref = pretrain_reference(2)
    run_dir = tmp_path / "run"

    def cmd():
        return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), ENTRY, *pretrain_sizes(run_dir)]

    proc = start(cmd(), ACCELERATE_USE_CPU="1", **TORCHELASTIC_STOP)
    seen, out = signal_group_at_step(proc, SIGNAL_AT, signal.SIGUSR1)
    at = check_stopped(run_dir, out, seen, signal.SIGUSR1, proc.returncode, zero=False)
    check_resumed(run_dir, ref, finish(start(cmd(), ACCELERATE_USE_CPU="1")), at)


def test_slurm_script_sigusr1_checkpoints_and_requeues(tmp_path):
    """launch/slurm/pretrain.sbatch, SIGUSR1 to the batch shell's group (SLURM's --signal=B:USR1@90): the job step
    checkpoints, the script requeues the job (`scontrol requeue`) and exits 0; the requeued job (the same script)
    resumes and finishes, without another requeue. ACCEL_CONFIG selects the 2-process CPU launcher file."""
    ref = pretrain_reference(2)
    run_dir = tmp_path / "run"
    slurm = sbatch_env(tmp_path / "slurm", ROOT, nodes=1, VENV=str(ROOT / ".venv"), GPUS_PER_NODE="2",
                       ACCEL_CONFIG="launch/accelerate/cpu_2proc.yaml")
    cmd = ["bash", str(ROOT / "launch" / "slurm" / "pretrain.sbatch"), *pretrain_sizes(run_dir)]
    proc = start(cmd, **slurm, MAIN_PORT=str(free_port()))
    seen, out = signal_group_at_step(proc, SIGNAL_AT, signal.SIGUSR1)
    at = check_stopped(run_dir, out, seen, signal.SIGUSR1, proc.returncode, zero=True)
    assert requeues(tmp_path / "slurm") == ["requeue 4242"]
    check_resumed(run_dir, ref, finish(start(cmd, **slurm, MAIN_PORT=str(free_port()))), at)
    assert requeues(tmp_path / "slurm") == ["requeue 4242"]


@pytest.mark.parametrize("script,sig", [("classify.py", signal.SIGTERM), ("linprobe.py", signal.SIGUSR1)])
def test_finetune_and_probe(tmp_path, script, sig):
    """`python finetune/classify.py` / `finetune/linprobe.py` (probe.cached=false: loader workers), one process."""
    ref = downstream_reference(script)
    run_dir = tmp_path / "run"
    extra = DOWNSTREAM_EXTRA[script]
    proc = start(downstream_cmd(script, run_dir, *extra))
    seen, out = signal_group_at_step(proc, SIGNAL_AT, sig)
    at = check_stopped(run_dir, out, seen, sig, proc.returncode, zero=True)
    check_resumed(run_dir, ref, finish(start(downstream_cmd(script, run_dir, *extra))), at,
                  weights="classifier_last.safetensors")
