"""Tests of recipes/cifar10/objectives.py and objectives_doc.py with the entry points replaced by a stub that writes
what they would (metrics.jsonl, encoder, eval.json): the equal-wall-clock step arithmetic, the commands each arm
runs, the result JSON, the rendered section with its chart, and docs/RESULTS.md gaining the section."""

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


def value(cmd: list[str], key: str) -> str | None:
    hits = [c.split("=", 1)[1] for c in cmd if c.startswith(key + "=")]
    return hits[-1] if hits else None


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """study() with prepare_data and run_stage replaced; returns the list of commands it ran."""
    ran: list[tuple[str, list[str]]] = []

    def fake_prepare(budget, args, env):
        assert budget.name == "cpu" and budget.probe_per_class == 1000  # the chain's cpu data
        return tmp_path / "shards", "probe_train", []

    def fake_run(name, cmd, stage_dir, env, done_file, reuse=True):
        ran.append((name, cmd))
        stage_dir.mkdir(parents=True, exist_ok=True)
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
        return {"stage": name, "command": " ".join(cmd[1:]), "seconds": 1.5, "returncode": 0, "reused": False}

    monkeypatch.setattr(study_mod, "prepare_data", fake_prepare)
    monkeypatch.setattr(study_mod, "run_stage", fake_run)
    return ran


def test_every_arm_gets_the_steps_of_the_same_wall_clock(stubbed, tmp_path):
    docs = tmp_path / "docs"
    result = study_mod.main(["--work", str(tmp_path / "work"), "--docs", str(docs), "--minutes", "2",
                             "--threads", "1"])
    pretrain = {name.split(":")[1]: cmd for name, cmd in stubbed if name.startswith("pretrain:")}
    # 2 minutes at the calibrated rate, batch 64 (the recipe's): steps = 120 s x images/s / 64
    for arm, rate in CALIBRATION_RATES.items():
        assert value(pretrain[arm], "run.steps") == str(round(120 * rate / 64))
    # augmentation arms cost what MAE costs per step: MAE's steps; the random arm keeps its single step
    assert value(pretrain["crop05"], "run.steps") == value(pretrain["mae"], "run.steps") == "240"
    assert value(pretrain["crop05"], "data.crop_scale") == "0.5,1.0"  # the arm's, after the baseline's 0.2,1.0
    assert value(pretrain["mae"], "data.augment") == "crop" and value(pretrain["nocrop"], "data.augment") == "none"
    assert value(pretrain["random"], "run.steps") == "1" and value(pretrain["random"], "optim.lr") == "1e-30"
    # every pretraining run is the chain's recipe with the k-NN monitor once at the end on the probe split
    for cmd in pretrain.values():
        assert cmd[1:3] == ["pretrain/mae.py", "pretrain/configs/cifar10_cpu.yaml"]
        assert value(cmd, "knn.every") == "0" and value(cmd, "knn.bank").endswith(":probe_train")
    calibrated = [name.split(":")[1] for name, _ in stubbed if name.startswith("calibrate:")]
    assert calibrated == list(CALIBRATION_RATES)

    mae = result["arms"]["mae"]
    assert result["calibration"]["images_per_sec"] == CALIBRATION_RATES  # the median after the warm-up steps
    assert mae["steps"] == 240 and mae["probe_top1"] == 50.0 and mae["knn_top1"] == pytest.approx(25.0)
    assert mae["loss_first"] == pytest.approx(statistics.fmean(2.0 / s for s in range(1, 21)))
    saved = json.loads((docs / "results" / "objectives_cpu.json").read_text())
    assert saved["arms"]["simmim"]["loss_curve"][:2] == [[1, 2.0], [2, 1.0]]  # the compact curves read back
    assert saved["hardware"]["threads"] == "1"

    md = (docs / "results" / "objectives_cpu.md").read_text()
    assert md.count("| MAE, normalised pixels, crop 0.2-1 + flip | 240 (0.31) |") == 2  # in both tables
    assert "**52.00**" in md and "**50.00**" in md  # best probe of each table in bold
    assert "- Objectives, linear probe: MAE 50.00 > MAE-HOG 47.00 > SimMIM 45.00 > data2vec 44.00; the random" in md
    assert "- Pretraining augmentation (MAE), k-NN: crop 0.5-1 26.00 > MAE 25.00 > no crop 15.00;" in md
    assert "the random encoder: 40.00" in md and "$" not in md  # every placeholder filled
    with Image.open(docs / "results" / "objectives_cpu.png") as img:
        assert img.format == "PNG" and img.size[0] == 900
    assert md.strip() in (docs / "RESULTS.md").read_text()  # RESULTS.md appends the study as written

    # --render-only rebuilds the same section from the JSON alone
    (docs / "results" / "objectives_cpu.md").unlink()
    assert study_mod.main(["--render-only", "--docs", str(docs)]) is None
    assert (docs / "results" / "objectives_cpu.md").read_text() == md


def test_one_arm_still_calibrates_mae_and_render_only_needs_the_json(stubbed, tmp_path, capsys):
    study_mod.main(["--work", str(tmp_path / "w"), "--docs", str(tmp_path / "d"), "--arm", "nocrop"])
    assert [name for name, _ in stubbed] == ["calibrate:mae", "pretrain:nocrop", "probe:nocrop"]
    with pytest.raises(SystemExit) as exit_info:
        study_mod.main(["--render-only", "--docs", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "objectives_cpu.json does not exist" in capsys.readouterr().err


def test_results_md_section_is_written_from_the_stored_study():
    """The stored docs/results/objectives_cpu.md is what objectives_doc renders from the stored JSON."""
    from recipes.cifar10.objectives_doc import study_section
    docs = Path(study_mod.REPO) / "docs" / "results"
    stored = json.loads((docs / "objectives_cpu.json").read_text())
    assert (docs / "objectives_cpu.md").read_text() == study_section(stored) + "\n"
