"""The run record and the config vocabulary (issue 22): every training entry point writes run.json with where its
numbers came from, and each entry point refuses keys that do not apply to its run and old spellings, in one line
naming the key."""

from __future__ import annotations

import json

import pytest
from conftest import DOWNSTREAM
from helpers_launch import tiny_args

from launch.errors import cli

RECORD = {"entry", "status", "command", "cwd", "git", "packages", "hardware", "world_size", "distributed_type",
          "precision", "micro_batch", "grad_accum_steps", "global_batch", "peak_lr", "steps", "start_time",
          "end_time", "final", "segments"}


def check_record(run, entry: str, global_batch: int, steps: int) -> dict:
    rec = json.loads((run / "run.json").read_text())
    assert RECORD <= set(rec), sorted(RECORD - set(rec))
    assert rec["entry"] == entry and rec["status"] == "finished" and rec["world_size"] == 1
    assert rec["global_batch"] == global_batch and rec["micro_batch"] * rec["grad_accum_steps"] == global_batch
    assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
    assert rec["packages"]["torch"] and rec["packages"]["accelerate"] and rec["hardware"]["cpu_cores"] >= 1
    assert rec["start_time"] <= rec["end_time"] and rec["segments"][-1]["end_step"] == steps
    assert rec["final"] is not None
    return rec


def test_every_training_entry_point_writes_its_run_record(tiny, tmp_path):
    from finetune.classify import main as classify
    from finetune.linprobe import main as linprobe
    from pretrain.mae import main as pretrain

    pretrain(tiny_args(tmp_path / "pre", steps=2))
    rec = check_record(tmp_path / "pre", "pretrain", 8, 2)
    assert rec["peak_lr"] == pytest.approx(1e-3 * 8 / 256) and rec["flops_per_image"] > 0
    assert rec["final"]["loss"] > 0
    logged = [r for r in map(json.loads, (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert all(r["tflops"] > 0 and 0 <= r["data_wait"] <= 1 for r in logged)  # the loop's utilisation figures
    common = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", *DOWNSTREAM, "run.steps=2",
              "optim.warmup_steps=1"]
    classify([*common, f"run.output_dir={tmp_path / 'ft'}", "run.eval_every=0"])
    rec = check_record(tmp_path / "ft", "finetune", 8, 2)
    assert rec["final"]["n_images"] == json.loads((tmp_path / "ft" / "eval.json").read_text())["n_images"]
    linprobe([*common, f"run.output_dir={tmp_path / 'lp'}"])
    check_record(tmp_path / "lp", "linprobe", 8, 2)


def test_a_resumed_run_keeps_its_segments(tmp_path):
    from pretrain.mae import main

    run = tmp_path / "run"
    main(tiny_args(run, steps=2))
    main(tiny_args(run, steps=4))
    rec = json.loads((run / "run.json").read_text())
    assert [(s["start_step"], s["end_step"], s["status"]) for s in rec["segments"]] == [(0, 2, "finished"),
                                                                                         (2, 4, "finished")]


@pytest.mark.parametrize("prog_module,args,key,why", [
    ("pretrain.mae", ["data2vec.top_k=2"], "data2vec.top_k", "no EMA teacher"),
    ("pretrain.mae", ["data.augment=none", "data.crop_scale=0.5,1"], "data.crop_scale", "data.augment=none"),
    ("finetune.classify", ["ema.decay=0.99"], "ema.decay", "ema.enabled=false"),
    ("finetune.linprobe", ["optim.betas=0.9,0.99"], "optim.betas", "optim.name=lars"),
    ("finetune.linprobe", ["probe.cached=true", "data.shuffle_buffer=10"], "data.shuffle_buffer", "cached"),
    ("finetune.evaluate", ["batch_size=5"], "batch_size", "data.eval_batch"),
    ("pictures.visualize", ["images=data/sample:test"], "images", "vis.images"),
    ("finetune.classify", ["data.path=data/sample"], "data.path", "data.train"),
    ("pretrain.mae", ["knn.every=5"], "knn.every", "run.eval_every"),
])
def test_keys_that_do_not_apply_and_old_spellings_are_refused(capsys, prog_module, args, key, why):
    import importlib

    module = importlib.import_module(prog_module)
    with pytest.raises(SystemExit) as exit_info:
        cli(module.PROG, module.main)(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"'{key}'" in err and why in err
