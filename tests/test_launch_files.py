"""Launch files and documented commands, exercised as users run them (issue 12, items 1 and 3).

The commands are read from README.md and docs/LAUNCH.md (```bash blocks and table cells) by this test, so the docs
cannot drift from what is tested: each one must match exactly one entry of COVERAGE, which says how it runs here
(as written, with only size overrides appended or placeholders of the reader's machine filled in: `CONFIG.yaml`,
`/data/...`, `10.0.0.1`, port 29500) or why it cannot run on a CPU box. Every file in launch/accelerate/ and the SLURM
script is run, on CPU: the ZeRO yamls with the precision they state (bf16, from the DeepSpeed JSON; no
`--mixed_precision` added), more processes than the box has cores reduced with `--num_processes 2` (a size), SLURM
through a fake `srun`/`scontrol`. Uninterrupted tiny runs are shared with tests/test_preemption.py (`shared_run`).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers_launch import (
    ACCELERATE,
    ENTRY,
    PYTHON,
    ROOT,
    SAMPLE,
    TORCHRUN,
    checkpoint_steps,
    downstream_reference,
    env,
    finish,
    free_port,
    kill_group,
    pretrain_reference,
    read_until_step,
    run_record,
    signal_group_at_step,
    start,
)
from helpers_slurm import requeues, sbatch_env

from launch.plan_report import check_plan

DOCS = [ROOT / "README.md", ROOT / "docs" / "LAUNCH.md"]
SBATCH = "launch/slurm/pretrain.sbatch"
LAUNCH_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "launch" / "accelerate").glob("*.yaml"))

# ------------------------------------------------------------------------------------------- reading the docs

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`]+)`")
_PROGRAMS = ("python", "python3.11", "accelerate", "torchrun", "sbatch")


def _is_command(text: str) -> bool:
    words = text.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return bool(words) and (words[0] in _PROGRAMS or words[0].startswith(".venv/bin/"))


def doc_commands() -> list[tuple[str, str]]:
    """(doc file, command) for every command of a ```bash block (continuations joined, comments dropped, `a && b`
    split) and every table cell's code span that starts with a program."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for lang, body in _FENCE.findall(text):
            if lang not in ("bash", "sh"):
                continue
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                found += [(doc.name, " ".join(part.split())) for part in line.split(" && ") if part.strip()]
        for line in text.splitlines():
            if line.startswith("|"):
                found += [(doc.name, " ".join(span.split())) for span in _SPAN.findall(line) if _is_command(span)]
    return found


# How each documented command is covered: (pattern, test that runs it, or "skip: why").
COVERAGE = [
    (r"^python3\.11 -m venv \.venv$", "skip: creates the environment the tests run in"),
    (r"^\.venv/bin/pip install", "skip: installs the package the tests run in"),
    (r"-m pytest", "skip: the test suite itself"),
    (r"^(accelerate launch|torchrun)$", "skip: a launcher's name in a table, not a command"),
    (r"^torchrun --nnodes N --nproc_per_node G", "skip: template for N real nodes (N, G, $NODE_RANK); its CPU form "
                                                 "is `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`"),
    (r"^(\.venv/bin/)?python pretrain/mae\.py( \.\.\.)?$", "test_one_process_reference"),
    (r"^python pretrain/mae\.py --help$", "test_help"),
    (r"^python pretrain/mae\.py CONFIG\.yaml run\.precision=bf16$", "test_one_process_bf16"),
    (r"^accelerate launch --config_file launch/accelerate/gpu1\.yaml ", "test_gpu1_simple_launcher"),
    (r"^accelerate launch --config_file launch/accelerate/ddp8\.yaml (?!--num_processes 4 )",
     "test_accelerate_yaml[ddp8]"),
    (r"^accelerate launch --config_file launch/accelerate/zero2\.yaml (?!--num_processes 4 )",
     "test_accelerate_yaml[zero2]"),
    (r"^accelerate launch --config_file launch/accelerate/fsdp2\.yaml pretrain/", "test_accelerate_yaml[fsdp2]"),
    # "Re-run on any number of processes": the same commands with another --num_processes (tests/test_elastic.py)
    (r"^accelerate launch --config_file launch/accelerate/ddp8\.yaml --num_processes 4 pretrain/",
     "test_elastic.py::test_ddp_four_to_two"),
    (r"^accelerate launch --config_file launch/accelerate/zero2\.yaml --num_processes 4 pretrain/",
     "test_elastic.py::test_zero2_four_to_two"),
    (r"^accelerate launch --config_file launch/accelerate/zero3\.yaml --num_processes 4 pretrain/",
     "test_elastic.py::test_zero3_two_to_three"),
    (r"^accelerate launch --config_file launch/accelerate/fsdp2\.yaml --num_processes 4 pretrain/",
     "test_elastic.py::test_fsdp2_four_to_two"),
    (r"^accelerate launch --config_file launch/accelerate/ddp8\.yaml --num_processes 4 finetune/classify\.py ",
     "test_elastic.py::test_finetune_four_to_two"),
    (r"^accelerate launch --config_file launch/accelerate/multinode\.yaml --machine_rank [01] ", "test_multinode"),
    (r"^ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pretrain/mae\.py( \.\.\.)?$",
     "test_two_process_reference"),
    (r"^ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pretrain/mae\.py$",
     "test_preemption.py::test_torchrun_two_processes_sigusr1"),
    (r"^ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_CONFIG_FILE=launch/deepspeed/zero2\.json torchrun ",
     "test_torchrun_deepspeed"),
    (r"^sbatch --nodes 4 launch/slurm/pretrain\.sbatch ", "test_slurm_as_written"),
    (r"^sbatch launch/slurm/pretrain\.sbatch 'data\.train=pipe:", "test_slurm_arguments_arrive_whole"),
    (r"^sbatch launch/slurm/pretrain\.sbatch \.\.\.$", "test_preemption.py::test_slurm_script_sigusr1_checkpoints"),
    (r"^python data/make_shards\.py ", "test_make_shards"),
    (r"^python finetune/(linprobe|classify)\.py encoder=runs/pretrain/encoder\.safetensors$", "test_downstream"),
    (r"^python finetune/linprobe\.py finetune/configs/probe_attentive\.yaml ", "test_attentive_probe_command"),
    (r"^python pretrain/mae\.py .*--plan( |$)", "test_plan_commands"),
    (r"^python finetune/evaluate\.py ", "test_evaluate"),
    (r"^python pictures/visualize\.py ", "test_visualize"),
    (r"^python models/convert\.py ", "test_convert"),
]


def coverage(command: str) -> str:
    hits = [how for pattern, how in COVERAGE if re.search(pattern, command)]
    assert len(hits) == 1, f"documented command {command!r} matches {len(hits)} COVERAGE entries: {hits}"
    return hits[0]


def documented(pattern: str) -> list[str]:
    """The documented commands matching `pattern` (at least one)."""
    hits = sorted({c for _, c in doc_commands() if re.search(pattern, c)})
    assert hits, f"no documented command matches {pattern}"
    return hits


# ------------------------------------------------------------------------------------- turning a doc line into argv

TINY = ["model.name=mae_vit_tiny_patch4_dec128d2b", "model.img_size=32", "model.overrides.patch_size=8",
        "model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "model.overrides.decoder_embed_dim=32", "model.overrides.decoder_depth=1",
        "model.overrides.decoder_num_heads=2"]


def sizes(run_dir, steps: int = 3) -> list[str]:
    """Size overrides for a launch-file run (also shrinking what an ImageNet recipe file sets)."""
    return [*TINY, f"data.train={SAMPLE}", "data.micro_batch=4", "data.num_workers=1", "data.shuffle_buffer=100",
            "optim.grad_accum_steps=1", "optim.warmup_steps=1", f"run.output_dir={run_dir}", f"run.steps={steps}",
            "run.log_every=1", f"run.save_every={steps}", "run.trackers=none", "run.progress=false",
            "knn.enabled=false", "vis.num_images=2"]


def placeholders(command: str, port: int) -> str:
    """Fill in what the docs leave to the reader's machine."""
    return (command.replace("CONFIG.yaml", "pretrain/configs/sample.yaml").replace("/data/in1k-wds", SAMPLE)
            .replace("10.0.0.1", "127.0.0.1").replace("29500", str(port)).replace(" ...", ""))


def argv(command: str, *, launcher_sizes=(), program_sizes=(), port=None) -> tuple[list[str], dict]:
    """(argv, env) of a documented command: programs from this environment, launcher size options inserted before
    the script, program size overrides appended."""
    words = shlex.split(placeholders(command, port or free_port()))
    extra_env = {}
    while "=" in words[0] and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        extra_env[key] = value
    program = {"python": PYTHON, ".venv/bin/python": PYTHON, "accelerate": ACCELERATE, "torchrun": TORCHRUN}
    words[0] = program.get(words[0], words[0])
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return [*words[:script], *launcher_sizes, *words[script:], *program_sizes], extra_env


def run_ok(cmd: list[str], extra_env: dict, timeout: float = 300, cwd=ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"{shlex.join(cmd)}\nexit {proc.returncode}\n{tail}"
    return proc.stdout + proc.stderr


def from_elsewhere(cmd: list[str]) -> list[str]:
    """The command as typed in another directory: each word naming a file or folder of the repository (the yaml, the
    script) given by its absolute path."""
    return [str(ROOT / w) if "/" in w and not w.startswith("/") and "=" not in w and (ROOT / w).exists() else w
            for w in cmd]


def finished(run_dir, steps: int) -> None:
    assert checkpoint_steps(run_dir) == [steps]
    assert (Path(run_dir) / "encoder.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- static checks


def test_every_documented_command_is_covered():
    commands = doc_commands()
    assert len(commands) > 20
    tests = {coverage(c) for _, c in commands}
    here = {name for name in globals() if name.startswith("test_")}
    for how in tests:
        if not how.startswith("skip:"):
            name = how.split("::")[-1].split("[")[0]
            assert name in here or how.startswith(("test_preemption.py::", "test_elastic.py::")), f"{how}: no such test"


def test_every_launch_file_is_valid_and_documented():
    """Each accelerate yaml parses as Accelerate reads it; none puts `mixed_precision` next to a DeepSpeed config file
    (Accelerate refuses that at start-up, on any device); every DeepSpeed JSON a yaml names exists and says bf16; each
    yaml and the SLURM script appear in a documented command (zero3.yaml in the ZeRO-2/ZeRO-3 table row)."""
    from accelerate.commands.config.config_args import load_config_from_file

    text = "\n".join(c for _, c in doc_commands()) + "\n" + (ROOT / "docs" / "LAUNCH.md").read_text()
    for name in LAUNCH_FILES:
        cfg = load_config_from_file(str(ROOT / name))
        ds_file = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
        if ds_file:
            assert cfg.mixed_precision is None, f"{name}: mixed_precision next to deepspeed_config_file"
            ds = json.loads((ROOT / ds_file).read_text())
            assert ds["bf16"]["enabled"] is True and "optimizer" not in ds and "scheduler" not in ds
            assert cfg.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"
        assert Path(name).name in text, f"{name} is in no documented command"
    assert SBATCH in text


# ------------------------------------------------------------------------------------- one process, two processes


@pytest.mark.slow
def test_one_process_reference():
    """README: `.venv/bin/python pretrain/mae.py` / LAUNCH.md `python pretrain/mae.py` (the shared reference)."""
    for command in documented(r"^(\.venv/bin/)?python pretrain/mae\.py( \.\.\.)?$"):
        assert argv(command)[0][:2] == [PYTHON, "pretrain/mae.py"]
    finished(pretrain_reference(1), 40)


@pytest.mark.slow
def test_two_process_reference():
    (command,) = documented(r"^ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pretrain/mae.py$")
    cmd, extra = argv(command)
    assert extra == {"ACCELERATE_USE_CPU": "1"} and cmd[1:5] == ["launch", "--multi_gpu", "--num_processes", "2"]
    finished(pretrain_reference(2), 40)


def test_help():
    (command,) = documented(r"--help$")
    out = run_ok(*argv(command))
    assert "run.output_dir" in out and "data.micro_batch" in out


@pytest.mark.slow
def test_one_process_bf16(tmp_path):
    (command,) = documented(r"^python pretrain/mae\.py CONFIG\.yaml run\.precision=bf16$")
    cmd, extra = argv(command, program_sizes=sizes(tmp_path / "run"))
    cmd.remove("run.precision=bf16")
    cmd.append("run.precision=bf16")  # after the sizes, as written (the sizes do not set the precision anyway)
    run_ok(cmd, extra)
    assert run_record(tmp_path / "run")["precision"] == "bf16"
    finished(tmp_path / "run", 3)


@pytest.mark.slow
def test_gpu1_simple_launcher(tmp_path):
    """gpu1.yaml as written (one process: Accelerate's simple launcher). Pins what docs/LAUNCH.md says about it: it
    does not wait for the trainer on SIGTERM; sent to the process group, the launcher ends at once with a non-zero
    status (it dies of the signal or exits 143, depending on the Accelerate version), and the trainer saves its
    checkpoint on its own."""
    import os

    (command,) = documented(r"launch/accelerate/gpu1\.yaml")
    run_dir = tmp_path / "run"
    cmd, extra = argv(command, program_sizes=sizes(run_dir, steps=40))
    proc = start(cmd, **extra)
    try:
        seen, lines = read_until_step(proc, 2)
        assert run_record(run_dir)["precision"] == "bf16"  # the yaml's mixed_precision reached the trainer
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) != 0  # the launcher ended (its exact status depends on the Accelerate version)
        rest, _ = proc.communicate(timeout=120)  # the trainer goes on (it holds the pipe) until its checkpoint
    finally:
        kill_group(proc)
    assert "stopped by SIGTERM" in "".join(lines) + rest
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and seen <= steps[0] < 40


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp8", "zero2", "zero3", "fsdp2"])
def test_accelerate_yaml(tmp_path, name):
    """ddp8.yaml (bf16 DDP), zero2.yaml and zero3.yaml (DeepSpeed, bf16 from the JSON), fsdp2.yaml (FSDP2, bf16) as
    written, with two processes instead of eight; the README's command for ddp8 and zero2, LAUNCH.md's for fsdp2, the
    ZeRO-2 command with zero3.yaml for ZeRO-3. The
    ZeRO ones run from a directory other than the repository's, the yaml and the script named by absolute paths
    (issue 26 item 9: the yaml's relative DeepSpeed JSON path used to fail there on every rank)."""
    source = "zero2" if name == "zero3" else name
    command = documented(rf"^accelerate launch --config_file launch/accelerate/{source}\.yaml pretrain/")[0]
    command = command.replace(f"{source}.yaml", f"{name}.yaml")
    cmd, extra = argv(command, launcher_sizes=["--num_processes", "2"], program_sizes=sizes(tmp_path / "run"))
    elsewhere = name.startswith("zero")
    if elsewhere:
        cmd = from_elsewhere(cmd)
        assert str(ROOT / "launch" / "accelerate" / f"{name}.yaml") in cmd and ENTRY in cmd
        (tmp_path / "elsewhere").mkdir()
    run_ok(cmd, extra, timeout=600, cwd=tmp_path / "elsewhere" if elsewhere else ROOT)
    rec = run_record(tmp_path / "run")
    kind = "DEEPSPEED" if name.startswith("zero") else "FSDP" if name == "fsdp2" else "MULTI_CPU"
    assert (rec["distributed_type"], rec["world_size"], rec["precision"]) == (kind, 2, "bf16"), rec
    assert rec["zero_stage"] == (int(name[-1]) if name.startswith("zero") else None)
    if name == "fsdp2":  # one shard unit per transformer Block; bf16 compute, gradients reduced in fp32
        assert {"encoder.blocks.0", "decoder_blocks.0"} <= set(rec["fsdp"]["units"]), rec["fsdp"]
        assert (rec["fsdp"]["param_dtype"], rec["fsdp"]["reduce_dtype"]) == ("bfloat16", "float32"), rec["fsdp"]
    finished(tmp_path / "run", 3)


@pytest.mark.slow
def test_missing_deepspeed_file_is_one_line(tmp_path):
    """A user's own yaml (the shipped zero2.yaml naming a DeepSpeed JSON that does not exist), launched as documented
    with two processes: each rank stops with one line naming the file, no trainer traceback."""
    (command,) = documented(r"^accelerate launch --config_file launch/accelerate/zero2\.yaml --num_processes 2 ")
    yaml_text = (ROOT / "launch" / "accelerate" / "zero2.yaml").read_text()
    assert "deepspeed_config_file: launch/deepspeed/zero2.json" in yaml_text
    (tmp_path / "my_zero2.yaml").write_text(yaml_text.replace("launch/deepspeed/zero2.json", "my_deepspeed.json"))
    cmd, extra = argv(command.replace("launch/accelerate/zero2.yaml", str(tmp_path / "my_zero2.yaml")),
                      program_sizes=sizes(tmp_path / "run"))
    proc = subprocess.run(from_elsewhere(cmd), cwd=tmp_path, env=env(**extra), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("pretrain/mae.py: error: ")]
    assert lines and all("my_deepspeed.json" in line for line in lines), out[-3000:]
    assert f'File "{ROOT}/pretrain/' not in out and f'File "{ROOT}/launch/' not in out, out[-3000:]


@pytest.mark.slow
def test_multinode(tmp_path):
    """The two-node commands of docs/LAUNCH.md, both machines on 127.0.0.1 with one process each."""
    port = free_port()
    procs = []
    for command in documented(r"launch/accelerate/multinode\.yaml --machine_rank [01] "):
        cmd, extra = argv(command, launcher_sizes=["--num_processes", "2"], program_sizes=sizes(tmp_path / "run"),
                          port=port)
        procs.append(start(cmd, **extra))
    assert len(procs) == 2
    for p in procs:
        finish(p, timeout=600)
    assert run_record(tmp_path / "run")["world_size"] == 2
    finished(tmp_path / "run", 3)


@pytest.mark.slow
def test_torchrun_deepspeed(tmp_path):
    (command,) = documented(r"^ACCELERATE_USE_DEEPSPEED=true .* torchrun ")
    cmd, extra = argv(command.replace("--nproc_per_node 8", "--nproc_per_node 2"),
                      launcher_sizes=["--master_port", str(free_port())], program_sizes=sizes(tmp_path / "run"))
    run_ok(cmd, extra, timeout=600)
    rec = run_record(tmp_path / "run")
    assert (rec["distributed_type"], rec["world_size"], rec["precision"]) == ("DEEPSPEED", 2, "bf16"), rec
    finished(tmp_path / "run", 3)


# --------------------------------------------------------------------------------------------------- SLURM


def _sbatch(command: str, tmp_path, *, nodes: int, program_sizes=(), **extra_env) -> tuple[list[str], dict]:
    words = shlex.split(placeholders(command, 0))
    assert words[0] == "sbatch"
    script = words.index(SBATCH)
    options = words[1:script]
    if "--nodes" in options:
        options[options.index("--nodes") + 1] = str(nodes)  # a size: the fake srun starts that many tasks
    slurm = sbatch_env(tmp_path / "slurm", ROOT, nodes=nodes, **extra_env)
    return ["bash", str(ROOT / SBATCH), *words[script + 1:], *program_sizes], slurm


@pytest.mark.slow
def test_slurm_as_written(tmp_path):
    """`sbatch --nodes 4 launch/slurm/pretrain.sbatch pretrain/configs/in1k_vit_base.yaml data.train=...` with the
    default ACCEL_CONFIG (ddp8.yaml), two fake nodes of one process each; SIGTERM to the batch shell's group (scancel):
    the job step checkpoints at the next step, the script exits 0 and does not requeue."""
    (command,) = documented(r"^sbatch --nodes 4 ")
    run_dir = tmp_path / "run"
    cmd, slurm = _sbatch(command, tmp_path, nodes=2, program_sizes=sizes(run_dir, steps=40), GPUS_PER_NODE="1",
                         VENV=str(ROOT / ".venv"), MAIN_PORT=str(free_port()))
    proc = start(cmd, **slurm)
    seen, out = signal_group_at_step(proc, 2, signal.SIGTERM, timeout=300)
    assert proc.returncode == 0, out[-5000:]
    rec = run_record(run_dir)
    assert (rec["distributed_type"], rec["world_size"], rec["precision"]) == ("MULTI_CPU", 2, "bf16"), rec
    assert rec["status"] == "stopped" and "stopped by SIGTERM" in out
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and seen <= steps[0] < 40
    assert requeues(tmp_path / "slurm") == []


@pytest.mark.slow
def test_slurm_arguments_arrive_whole(tmp_path):
    """Item 3: a `pipe:` spec with spaces and a brace pattern reach the program as ONE argument each, on every node
    (a stand-in `accelerate` in VENV prints the argv it gets)."""
    fake_venv = tmp_path / "venv" / "bin"
    fake_venv.mkdir(parents=True)
    out_dir = tmp_path / "argv"
    out_dir.mkdir()
    # one file per task: two fake nodes printing to one pipe at once could interleave their lines
    (fake_venv / "accelerate").write_text(f"#!{PYTHON}\nimport json, os, sys\n"
                                          f"open(os.path.join({str(out_dir)!r}, str(os.getpid())), 'w')"
                                          f".write(json.dumps(sys.argv[1:]))\n")
    (fake_venv / "accelerate").chmod(0o755)
    (command,) = documented(r"^sbatch launch/slurm/pretrain\.sbatch 'data\.train=pipe:")
    brace = "vis.images=/shards/val-{000000..000009}.tar"
    cmd, slurm = _sbatch(command, tmp_path, nodes=2, program_sizes=[brace], VENV=str(tmp_path / "venv"))
    run_ok(cmd, slurm)
    got = sorted((json.loads(f.read_text()) for f in out_dir.iterdir()), key=str)
    assert len(got) == 2  # one task per node
    spec = "data.train=pipe:aws s3 cp s3://bucket/in1k/train-{000000..001281}.tar -"
    for rank, args in enumerate(sorted(got, key=lambda a: a[a.index("--machine_rank") + 1])):
        assert args[args.index("--machine_rank") + 1] == str(rank)
        assert args[-3:] == ["pretrain/mae.py", spec, brace]
        assert args[args.index("--num_machines") + 1] == "2" and args[args.index("--main_process_ip") + 1]


# ----------------------------------------------------------------------------------------- data and downstream


@pytest.mark.slow
def test_make_shards(tmp_path):
    from PIL import Image

    (command,) = documented(r"^python data/make_shards\.py ")
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 16), (c * 100, i * 40, 7)).save(tmp_path / "in" / cls / f"{i}.jpg")
    command = command.replace("/data/imagenet/train", str(tmp_path / "in")).replace("/data/in1k-wds",
                                                                                   str(tmp_path / "out"))
    cmd, extra = argv(command.replace("--workers 8", "--workers 2"))
    out = run_ok(cmd, extra)
    assert "10 images in 1 shards" in out
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]["num_classes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("script", ["linprobe.py", "classify.py"])
def test_downstream(script):
    """README: `python finetune/<script> encoder=runs/pretrain/encoder.safetensors` (shared with the pre-emption
    tests; the encoder is the one-process reference run's)."""
    (command,) = documented(rf"^python finetune/{script} encoder=")
    assert argv(command)[0][:2] == [PYTHON, f"finetune/{script}"]
    run_dir = downstream_reference(script)
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["n_images"] == 1000 and summary["steps"] == 40


@pytest.mark.slow
def test_attentive_probe_command(tmp_path):
    """README: the attentive probe through its documented file (cached fp16 tokens, AdamW), on the one-process
    reference run's encoder; exactly-once evaluation over the whole test split."""
    (command,) = documented(r"^python finetune/linprobe\.py finetune/configs/probe_attentive\.yaml ")
    encoder = pretrain_reference(1) / "encoder.safetensors"
    run_dir = tmp_path / "run"
    small = [f"run.output_dir={run_dir}", "run.steps=4", "data.global_batch=8", "data.eval_batch=100",
             "data.num_workers=1", "run.trackers=none", "run.progress=false"]
    run_ok(*argv(command.replace("runs/pretrain/encoder.safetensors", str(encoder)), program_sizes=small))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["probe"]["head"] == "attentive"
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n_images"] == 1000 and result["steps"] == 4


@pytest.mark.slow
def test_plan_commands(tmp_path):
    """README: each `--plan` command as written (plan size options and the tiny model appended): a plan.json in the
    run directory, the figures printed, and the machines named with --plan-for priced."""
    for i, command in enumerate(documented(r"^python pretrain/mae\.py .*--plan( |$)")):
        run_dir = tmp_path / f"run{i}"
        out = run_ok(*argv(command, program_sizes=[*sizes(run_dir, steps=20), "--plan-steps", "5",
                                                   "--plan-loader-sec", "0.2"]))
        plan = json.loads((run_dir / "plan.json").read_text())
        assert check_plan(plan) == []
        assert plan["predicted"]["wall_clock"]["total_sec"] > 0 and "[predicted]" in out
        assert "bound" in out and "wall-clock" in out
        if "--plan-for H100x8" in command:
            (h100,) = plan["predicted"]["targets"]
            assert (h100["name"], h100["count"]) == ("H100", 8) and h100["cost"] == pytest.approx(
                2.50 * h100["device_hours"])


@pytest.mark.slow
def test_evaluate(tmp_path):
    (command,) = documented(r"^python finetune/evaluate\.py ")
    classify = downstream_reference("classify.py")
    cmd, extra = argv(command.replace("runs/finetune", str(classify)), program_sizes=["data.eval_batch=100",
                                                                                      f"output={tmp_path / 'e.json'}"])
    run_ok(cmd, extra)
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n_images"] == 1000


@pytest.mark.slow
def test_visualize(tmp_path):
    (command,) = documented(r"^python pictures/visualize\.py ")
    pretrain = pretrain_reference(1)
    command = command.replace("runs/pretrain", str(pretrain)).replace("runs/pictures", str(tmp_path / "pics"))
    run_ok(*argv(command, program_sizes=["vis.num_images=2"]))
    assert (tmp_path / "pics" / "summary.json").is_file()


@pytest.mark.slow
def test_convert(tmp_path):
    """README: `python models/convert.py --input mae_pretrain_vit_base_full.pth ...`, the official file stood in for
    by the reference run's weights in the official layout (`{"model": ...}`, official key names)."""
    import torch
    from safetensors.torch import load_file

    from models.convert import to_official

    (command,) = documented(r"^python models/convert\.py ")
    mae = load_file(str(pretrain_reference(1) / "mae.safetensors"))
    torch.save({"model": to_official(mae)}, tmp_path / "mae_pretrain_vit_base_full.pth")
    command = command.replace("mae_pretrain_vit_base_full.pth", str(tmp_path / "mae_pretrain_vit_base_full.pth"))
    command = command.replace("--output encoder.safetensors", f"--output {tmp_path / 'encoder.safetensors'}")
    run_ok(*argv(command))
    encoder = load_file(str(tmp_path / "encoder.safetensors"))
    reference = load_file(str(pretrain_reference(1) / "encoder.safetensors"))
    assert encoder.keys() == reference.keys() and all(torch.equal(encoder[k], reference[k]) for k in encoder)
