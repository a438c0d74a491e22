"""What a run reads back and keeps (issue 26): no code runs from a run directory (a code-carrying pickle planted under
every file name a run directory holds, for every entry point's resume), a resume that would change the model or the
objective is refused naming each key and both values while the listed keys may change, a refused resume writes
nothing, an unbounded micro-batch is refused at start, a stop signal while the run waits for its first batch ends it,
a stop signal during the final export waits for it, and the one-line errors of items 7 and 8."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
from conftest import DOWNSTREAM, TINY_MODEL
from helpers_launch import ENTRY, PYTHON, SAMPLE, kill_group, start, tiny_args

from core.errors import UserError
from launch.errors import cli


class Planted:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a planted file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def snapshot(run_dir: Path) -> dict:
    """Every file of a run directory with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def plant_everywhere(run_dir: Path, main, args: list[str], tmp: Path) -> list[str]:
    """For each file of `run_dir`: a copy of the directory with that file replaced by a code-carrying pickle, resumed
    by `main(args)` (pointed at the copy). No resume may run the code; a resume either finishes or stops with a
    user error. Returns the files whose planting refused the resume."""
    refused = []
    files = [p.relative_to(run_dir) for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"]
    assert any(f.parts[0] == "checkpoints" for f in files)
    for i, name in enumerate(files):
        copy, marker = tmp / f"copy{i}", tmp / f"ran{i}"
        shutil.copytree(run_dir, copy)
        (copy / name).write_bytes(pickle.dumps(Planted(marker)))
        try:
            main([a.replace(str(run_dir), str(copy)) for a in args])
        except UserError as exc:
            assert "\n" not in str(exc), str(exc)
            refused.append(str(name))
        assert not marker.exists(), f"planting {name} ran code on resume"
        shutil.rmtree(copy)
    return refused


@pytest.mark.slow
def test_no_code_runs_from_a_run_directory_of_any_entry_point(tiny, tmp_path):
    """Item 1: pretraining (data2vec: its EMA teacher is registered state), fine-tuning (with EMA) and probing (the
    feature cache, streamed and cached paths) are run to a checkpoint and resumed with one planted file at a time."""
    from finetune.classify import main as classify
    from finetune.linprobe import main as linprobe
    from pretrain.mae import main as pretrain

    pre = tmp_path / "pre"
    pre_args = [a for a in tiny_args(pre, "model.objective=data2vec", "data2vec.top_k=1", "run.save_every=2",
                                     steps=2) if not a.startswith("model.overrides.decoder_")]
    pretrain(pre_args)
    refused = plant_everywhere(pre, pretrain, [*pre_args, "run.steps=3"], tmp_path / "p")
    assert "checkpoints/step_000002/tessera_registered.safetensors" in refused  # the teacher: refused, not run
    assert any(name.endswith("random_states_0.pkl") for name in refused)
    downstream = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", *DOWNSTREAM, "run.save_every=2",
                  "optim.warmup_steps=1"]
    for name, main, extra in (("ft", classify, ["ema.enabled=true", "run.eval_every=0"]),
                              ("lp", linprobe, []), ("lp_stream", linprobe, ["probe.cached=false"])):
        run = tmp_path / name
        args = [*downstream, *extra, f"run.output_dir={run}", "run.steps=2"]
        main(args)
        refused = plant_everywhere(run, main, [*args[:-1], "run.steps=3"], tmp_path / f"{name}-p")
        assert any(name.endswith("optimizer.bin") for name in refused)


def test_planted_pickle_in_a_checkpoint_is_refused_in_one_line_naming_it(tmp_path, capsys):
    """Item 1, as users see it: the command stops with exit code 2 and one line naming the file; no code ran."""
    from pretrain.mae import PROG, main

    args = tiny_args(tmp_path / "run", "model.objective=data2vec", "data2vec.top_k=1", steps=2)
    args = [a for a in args if not a.startswith("model.overrides.decoder_")]
    main(args)
    victim = tmp_path / "run" / "checkpoints" / "step_000002" / "tessera_registered.safetensors"
    victim.write_bytes(pickle.dumps(Planted(tmp_path / "ran")))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(PROG, main)([*args, "run.steps=4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{PROG}: error: ")
    assert "tessera_registered.safetensors" in err and not (tmp_path / "ran").exists()


def test_resume_refuses_model_and_objective_changes_and_writes_nothing(tmp_path):
    """Items 2 and 3: a head count or mask ratio given to a saved run is refused, naming each key with both values
    and the way out; the refused run leaves the run directory exactly as it was (config.yaml included)."""
    from launch.checkpoint import ResumeMismatch
    from pretrain.mae import main

    run = tmp_path / "run"
    main(tiny_args(run, steps=2))
    before = snapshot(run)
    with pytest.raises(ResumeMismatch) as err:
        main(tiny_args(run, "model.overrides.num_heads=4", "model.mask_ratio=0.5", steps=4))
    msg = str(err.value)
    assert "model.overrides.num_heads: 2 -> 4" in msg and "model.mask_ratio: 0.75 -> 0.5" in msg
    assert "run.output_dir" in msg and "\n" not in msg
    assert snapshot(run) == before


def test_resume_takes_the_keys_that_may_change(tmp_path, capsys):
    """Item 2: the keys listed as changeable (steps, logging cadence, workers, ...) resume, and the change is said."""
    from launch.session import RESUME_MAY_CHANGE
    from pretrain.mae import main

    assert {"run.steps", "run.log_every", "data.num_workers"} <= set(RESUME_MAY_CHANGE)
    run = tmp_path / "run"
    main(tiny_args(run, steps=2))
    capsys.readouterr()
    main(tiny_args(run, "run.log_every=2", steps=4))
    out = capsys.readouterr().out
    assert "resuming at step 2" in out and "run.log_every: 1 -> 2" in out and "run.steps: 2 -> 4" in out
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_unbounded_micro_batch_is_refused_at_start(tmp_path, capsys):
    """Item 4: no hang, one line naming data.micro_batch and the numbers, before any loader worker starts."""
    from pretrain.mae import PROG, main

    with pytest.raises(SystemExit) as exit_info:
        cli(PROG, main)(tiny_args(tmp_path / "run", "data.micro_batch=100000000", "data.num_workers=2"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "data.micro_batch=100,000,000" in err and "4,000" in err


def _stalled_dataset(tmp_path: Path) -> Path:
    """The shipped sample's train split described by a dataset.json whose shards are read through a command that
    never delivers (remote shards that stall): a run waits for its first batch for ever."""
    meta = json.loads((Path(SAMPLE) / "dataset.json").read_text())
    out = tmp_path / "stalled"
    out.mkdir()
    meta["shard_url"] = "pipe:tail -f /dev/null # {name}"  # a download that never delivers a byte
    meta["splits"] = {"train": meta["splits"]["train"]}
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


@pytest.mark.slow
def test_stop_signal_while_waiting_for_the_first_batch(tmp_path):
    """Item 4: SIGTERM to the process group of a run still waiting for its first batch ends it promptly, exit 0,
    with a message; nothing was saved (there is nothing to save)."""
    run = tmp_path / "run"
    cmd = [PYTHON, ENTRY, *TINY_MODEL, f"data.train={_stalled_dataset(tmp_path)}", "data.num_workers=1",
           "data.micro_batch=8", f"run.output_dir={run}", "run.trackers=none", "run.progress=false",
           "knn.enabled=false", "vis.num_images=0"]
    proc = start(cmd)
    try:
        for line in proc.stdout:
            if line.startswith("run dir"):  # the summary's last line: the loop starts, waiting for batch 1
                break
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM before its first step" in out
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_stop_signal_during_the_final_export_waits_for_it(tmp_path, capsys, monkeypatch):
    """Item 8: a stop signal that reaches the process while the final export runs (here: just before the encoder is
    written): the export finishes, the run says so and ends normally; its files are whole."""
    from safetensors.torch import load_file

    from pretrain import mae

    real = mae.save_encoder

    def signalled_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler's signal does to the rank, mid-export
        return real(*args, **kwargs)

    monkeypatch.setattr(mae, "save_encoder", signalled_then_save)
    run = tmp_path / "run"
    mae.main(tiny_args(run, steps=2))
    assert "SIGTERM arrived during the final export" in capsys.readouterr().out
    assert load_file(str(run / "encoder.safetensors")) and load_file(str(run / "mae.safetensors"))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not list(run.glob("*.tmp*"))


def test_full_disk_during_the_final_export_is_one_line(tmp_path, capsys, monkeypatch):
    """Item 7: the disk fills while the weights are written: one line naming the file, exit 2; the run record says
    the run failed."""
    from pretrain import mae

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "mae.safetensors"))

    monkeypatch.setattr(mae, "save_weights", full)
    with pytest.raises(SystemExit) as exit_info:
        cli(mae.PROG, mae.main)(tiny_args(tmp_path / "run", steps=1))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "disk is full" in err and "mae.safetensors" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("make", ["read_only", "a_file"])
def test_unusable_output_path_is_one_line(tmp_path, capsys, make):
    """Item 7: a read-only parent or a file where the run directory should be: one line naming the path."""
    from pretrain.mae import PROG, main

    if make == "read_only":
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        if os.access(parent, os.W_OK):  # root writes into read-only folders: a kernel folder refuses it too
            parent = Path("/sys/tessera-test")
        run = parent / "run"
    else:
        parent = run = tmp_path / "file"
        run.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        cli(PROG, main)(tiny_args(run, steps=1))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and str(parent) in err


def test_channel_counts_that_disagree_are_refused_at_start(tmp_path, capsys):
    """Item 7: a 4-channel dataset with model.in_chans=3 is refused before the model is built (it crashed at step 1),
    naming both counts."""
    from pretrain.mae import PROG, main

    data = tmp_path / "four"
    shutil.copytree(SAMPLE, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["train"]["channels"] = 4  # what data/make_shards.py records for 4-channel images
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        cli(PROG, main)(tiny_args(tmp_path / "run", f"data.train={data}", "model.in_chans=3", steps=1))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "model.in_chans=3" in err and "4 channels" in err
