"""Tests of recipes/cifar10/objectives.py and objectives_report.py with the entry points replaced by a stub that writes
what they write (run.json, metrics.jsonl, encoder, eval.json): the equal-wall-clock step arithmetic, the commands
each arm runs, the stored record, the rendered blocks with their chart, and --render-only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from recipes.cifar10 import objectives as study_mod

CALIBRATION_RATES = {"mae": 128.0, "mae_hog": 96.0, "simmim": 48.0, "data2vec": 32.0}  # images/s, per arm
PROBE_TOP1 = {"random": 40.0, "mae": 50.0, "mae_hog": 47.0, "simmim": 45.0, "data2vec": 44.0, "crop05": 52.0,
              "nocrop": 30.0}
RUN = {"git": {"commit": "0123456789abcdef", "dirty": False}, "packages": {"torch": "9.9", "timm": "8.8"},
       "hardware": {"cpu": "Test CPU", "cpu_cores": 2, "memory_gb": 4.0, "gpus": []}, "status": "finished"}


def value(cmd: list[str], key: str) -> str | None:
    hits = [c.split("=", 1)[1] for c in cmd if c.startswith(key + "=")]
    return hits[-1] if hits else None


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """study() with prepare_data and run_stage replaced; returns the list of commands it ran."""
    ran: list[tuple[str, list[str]]] = []

    def fake_prepare(source, per_class, args, env):
        assert (source, per_class) == ("cifar", 1000)  # the chain's cpu data
        return Path(args.work) / "shards", "probe_train", []  # the chain's layout: shards inside --work

    def fake_run(name, cmd, stage_dir, env, done_file, reuse=True):
        ran.append((name, cmd))
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "run.json").write_text(json.dumps(RUN))
        arm = name.split(":")[1]
        if name.startswith("calibrate:"):
            rate = CALIBRATION_RATES[arm]
            rows = [{"step": s, "loss": 1.0, "images_per_sec": rate if s > 10 else 1.0} for s in range(1, 41)]
            (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif name.startswith("pretrain:"):
            steps = int(value(cmd, "run.steps"))
            rows = [{"step": s, "loss": 2.0 / s, "images_per_sec": 100.0, "epoch": s * 64 / 50_000}
                    for s in range(1, steps + 1)]
            rows[-1]["knn_top1"] = PROBE_TOP1[arm] / 200
            rows.insert(0, {"step": 0, "loss": None})  # a log window whose steps were all skipped (strict JSON null)
            (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (stage_dir / "encoder.safetensors").write_bytes(b"x")
        else:
            (stage_dir / "eval.json").write_text(json.dumps({"top1": PROBE_TOP1[arm], "top5": 90.0,
                                                             "n_images": 10_000}))
        return {"stage": name, "command": " ".join(["python", *cmd[1:]]), "seconds": 1.5, "returncode": 0,
                "reused": False}

    monkeypatch.setattr(study_mod, "prepare_data", fake_prepare)
    monkeypatch.setattr(study_mod, "run_stage", fake_run)
    return ran


def test_every_arm_gets_the_steps_of_the_same_wall_clock(stubbed, tmp_path):
    docs = tmp_path / "docs"
    record = study_mod.main(["--work", str(tmp_path / "work"), "--docs", str(docs), "--minutes", "2",
                             "--threads", "1"])
    pretrain = {name.split(":")[1]: cmd for name, cmd in stubbed if name.startswith("pretrain:")}
    # 2 minutes at the calibrated rate, batch 64 (the recipe's): steps = 120 s x images/s / 64
    for arm, rate in CALIBRATION_RATES.items():
        assert value(pretrain[arm], "run.steps") == str(round(120 * rate / 64))
    # augmentation arms cost what MAE costs per step: MAE's steps; the random arm keeps its single step
    assert value(pretrain["crop05"], "run.steps") == value(pretrain["mae"], "run.steps") == "240"
    assert value(pretrain["crop05"], "data.crop_scale") == "0.5,1.0"  # the arm's, after the baseline's 0.2,1.0
    assert value(pretrain["mae"], "data.augment") == "crop" and value(pretrain["nocrop"], "data.augment") == "none"
    assert value(pretrain["nocrop"], "data.crop_scale") is None  # no crop keys where augmentation is off (refused)
    assert value(pretrain["random"], "run.steps") == "1" and value(pretrain["random"], "optim.lr") == "1e-30"
    # every pretraining run is the chain's recipe with the k-NN monitor once at the end on the probe split
    for cmd in pretrain.values():
        assert cmd[1:3] == ["pretrain/mae.py", "pretrain/configs/cifar10_cpu.yaml"]
        assert value(cmd, "run.eval_every") == "0" and value(cmd, "knn.bank").endswith(":probe_train")
        assert value(cmd, "model.pool") == "avg"
    calibrated = [name.split(":")[1] for name, _ in stubbed if name.startswith("calibrate:")]
    assert calibrated == list(CALIBRATION_RATES)
    probes = [cmd for name, cmd in stubbed if name.startswith("probe:")]
    assert all(value(cmd, "data.train").endswith("shards:probe_train") for cmd in probes)

    saved = json.loads((docs / "results" / "objectives_cpu.json").read_text())
    assert saved == json.loads(json.dumps(record))  # the compact loss curves read back
    stages = {s["stage"]: s for s in saved["stages"]}
    # the calibration rate: the median after the warm-up steps
    assert {k: stages[f"calibrate:{k}"]["metrics"]["images_per_sec"] for k in CALIBRATION_RATES} == CALIBRATION_RATES
    assert stages["pretrain:mae"]["metrics"]["steps"] == 240 and stages["probe:mae"]["eval"]["top1"] == 50.0
    assert stages["pretrain:simmim"]["metrics"]["loss_curve"][:2] == [[1, 2.0], [2, 1.0]]
    assert saved["threads"] == "1" and saved["provenance"]["git"]["commit"] == "0123456789abcdef"
    assert str(tmp_path) not in json.dumps(saved)

    md = (docs / "RESULTS.md").read_text()
    assert md.count("| MAE, normalised pixels, crop 0.2-1 + flip | 240 (0.31) |") == 2  # in both tables
    loss_first = statistics.fmean(2.0 / s for s in range(1, 21))
    assert f"| 2 s | 100 | {loss_first:.3f} -> " in md  # the mean of the first 20 logged losses
    assert "| 25.00 | 50.00 |" in md and "**52.00**" in md and "**50.00**" in md  # best probe of each table in bold
    assert "- Objectives, linear probe: MAE 50.00 > MAE-HOG 47.00 > SimMIM 45.00 > data2vec 44.00; the random" in md
    assert "- Pretraining augmentation (MAE), k-NN: crop 0.5-1 26.00 > MAE 25.00 > no crop 15.00;" in md
    assert "(median after the first 10 steps: mae 128, mae_hog 96, simmim 48, data2vec 32)" in md
    assert "commit `0123456`. Machine: Test CPU, 2 cores, no GPU,\nOMP_NUM_THREADS=1, torch 9.9, timm 8.8." in md
    assert "the random encoder: 40.00" in md and "{" not in md  # every value filled in
    with Image.open(docs / "results" / "objectives_cpu.png") as img:
        assert img.format == "PNG" and img.size[0] == 900

    # --render-only rebuilds the same blocks from the stored record alone
    (docs / "RESULTS.md").unlink()
    assert study_mod.main(["--render-only", "--docs", str(docs)]) is None
    assert (docs / "RESULTS.md").read_text() == md


def test_one_arm_still_calibrates_mae_and_render_only_needs_the_json(stubbed, tmp_path, capsys):
    study_mod.main(["--work", str(tmp_path / "w"), "--docs", str(tmp_path / "d"), "--arm", "nocrop"])
    assert [name for name, _ in stubbed] == ["calibrate:mae", "pretrain:nocrop", "probe:nocrop"]
    with pytest.raises(SystemExit) as exit_info:
        study_mod.main(["--render-only", "--docs", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "objectives_cpu.json does not exist" in capsys.readouterr().err
