"""Tests of recipes/cifar10/chain.py and its modules (stages, shards, record, results_doc, loss_plot): stage running
and reuse, data helpers, the stage wiring (with the entry points replaced by a stub), the results document rendered
from its template, the loss-curve chart, and the micro budget run end to end as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recipes.cifar10 import chain as chain_mod
from recipes.cifar10.loss_plot import draw_loss_curve, loss_figure, moving_average
from recipes.cifar10.results_doc import write_results_md
from recipes.cifar10.shards import TARBALL_ENV, class_subset, default_tarball, ensure_cifar
from recipes.cifar10.stages import REPO, ChainError, ChainInputError, run_stage, shell_join

# ------------------------------------------------------------------------------------------------- loss curve


def test_moving_average_hand_worked():
    # half-width 1: (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4)/2
    assert moving_average([1.0, 2.0, 3.0, 4.0], 1) == pytest.approx([1.5, 2.0, 3.0, 3.5])
    assert moving_average([3.0, 1.0], 0).tolist() == [3.0, 1.0]
    # a window wider than the series is cut to it: the plain mean in the middle
    assert moving_average([1.0, 2.0, 6.0], 5)[1] == pytest.approx(3.0)


def test_loss_figure_plots_the_logged_values_and_their_centred_mean():
    steps = np.arange(1, 161)
    losses = 1.0 / steps
    points = [[int(s), float(v)] for s, v in zip(steps, losses)]
    points.insert(5, [5, float("nan")])  # a non-finite value is left out
    ax = loss_figure(points, title="t", ylabel="y").axes[0]
    raw, smooth = ax.get_lines()
    np.testing.assert_array_equal(raw.get_xdata(), steps)
    np.testing.assert_allclose(raw.get_ydata(), losses)
    # 160 points -> half-width 2: the centred mean of 5 values, by hand at step 10 (index 9)
    np.testing.assert_array_equal(smooth.get_xdata(), steps)
    assert smooth.get_ydata()[9] == pytest.approx(np.mean(losses[7:12]))
    assert ax.get_title() == "t" and ax.get_ylabel() == "y" and ax.get_xlabel() == "optimizer step"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per logged step", "centred mean of 5"]


def test_loss_curve_png_and_degenerate_inputs(tmp_path):
    path = draw_loss_curve([[1, 0.5], [2, 0.4]], tmp_path / "sub" / "c.png", title="t")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (900, 540)
    ax = loss_figure([[7, 0.3]]).axes[0]  # one point: a marker
    assert [(line.get_xdata().tolist(), line.get_marker()) for line in ax.get_lines()] == [([7.0], "o")]
    ax = loss_figure([[1, float("nan")]]).axes[0]  # nothing finite: no line, a note instead
    assert ax.get_lines() == [] and [t.get_text() for t in ax.texts] == ["no loss values logged"]


# ------------------------------------------------------------------------------------------------- stages


def test_run_stage_records_reuses_and_fails(tmp_path):
    done = tmp_path / "out.txt"
    cmd = [sys.executable, "-c", f"open({str(done)!r}, 'w').write('x'); print('hello')"]
    rec = run_stage("demo", cmd, tmp_path / "demo", {}, done)
    assert rec["returncode"] == 0 and not rec["reused"]
    assert "hello" in (tmp_path / "demo" / "chain_stage.log").read_text()
    again = run_stage("demo", cmd, tmp_path / "demo", {}, done)
    assert again["reused"]
    # a different command is not reused, and starts from an emptied stage folder
    (tmp_path / "demo" / "stale_checkpoint").write_text("old")
    cmd2 = cmd + ["--extra"]
    assert not run_stage("demo", cmd2, tmp_path / "demo", {}, done)["reused"]
    assert not (tmp_path / "demo" / "stale_checkpoint").exists()
    # reuse=False runs it again even when nothing changed, also from an emptied folder
    (tmp_path / "demo" / "stale_checkpoint").write_text("old")
    assert not run_stage("demo", cmd2, tmp_path / "demo", {}, done, reuse=False)["reused"]
    assert not (tmp_path / "demo" / "stale_checkpoint").exists()
    # an interrupted stage (started, no exit code) keeps its folder, so the entry point can resume
    (tmp_path / "demo" / "chain_stage.json").write_text(json.dumps({"command": shell_join(cmd2), "returncode": None}))
    (tmp_path / "demo" / "checkpoint").write_text("resume me")
    assert not run_stage("demo", cmd2, tmp_path / "demo", {}, done)["reused"]
    assert (tmp_path / "demo" / "checkpoint").is_file()
    with pytest.raises(ChainError, match=r"stage 'bad' failed with exit code 3"):
        run_stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad", {}, None)
    with pytest.raises(ChainError, match="did not write"):
        run_stage("lazy", [sys.executable, "-c", "pass"], tmp_path / "lazy", {}, tmp_path / "never.txt")


# ------------------------------------------------------------------------------------------------- data


def _tiny_tree(root: Path, classes=("a", "b"), n=3):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i:04d}.jpg").write_bytes(b"not really a jpeg")


def test_class_subset_links_first_images(tmp_path):
    _tiny_tree(tmp_path / "train")
    out = class_subset(tmp_path / "train", tmp_path / "sub", 2)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert names == ["a/0000.jpg", "a/0001.jpg", "b/0000.jpg", "b/0001.jpg"]
    assert all(p.is_symlink() for p in out.rglob("*.jpg"))
    with pytest.raises(ChainError, match="fewer than the 5"):
        class_subset(tmp_path / "train", tmp_path / "sub2", 5)


def test_ensure_cifar_unpacks_once(tmp_path):
    src = tmp_path / "src"
    _tiny_tree(src / "train")
    _tiny_tree(src / "test")
    tarball = tmp_path / "c.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
        tar.add(src / "test", arcname="test")
    dest = ensure_cifar(tarball, tmp_path / "cifar")
    assert (dest / "train" / "a" / "0000.jpg").is_file()
    assert ensure_cifar(tmp_path / "missing.tar.gz", dest) == dest  # already there: the tarball is not needed
    with pytest.raises(ChainInputError, match=rf"tarball not found.*--tarball PATH or set {TARBALL_ENV}"):
        ensure_cifar(tmp_path / "missing.tar.gz", tmp_path / "elsewhere")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    with pytest.raises(ChainInputError, match="does not hold train/ and test/"):
        ensure_cifar(bad, tmp_path / "cifar_bad")


def test_tarball_comes_from_the_environment_else_beside_the_checkout(monkeypatch):
    monkeypatch.setenv(TARBALL_ENV, "/data/c10.tar.gz")
    assert default_tarball() == Path("/data/c10.tar.gz")
    monkeypatch.delenv(TARBALL_ENV)
    assert default_tarball() == REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def test_missing_tarball_is_one_line_naming_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chain_mod.main(["--budget", "cpu", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"),
                        "--tarball", str(tmp_path / "nope.tar.gz"), "--cifar-dir", str(tmp_path / "cifar")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recipes/cifar10/chain.py: error: CIFAR-10 tarball not found") and err.count("\n") == 1
    assert "--tarball" in err and TARBALL_ENV in err


# ------------------------------------------------------------------------------------------------- wiring + document


def _fake_run_stage(calls):
    """Stands in for the entry points: writes the files each one would write, with made-up accuracies."""
    acc = {"probe_mae": 45.5, "probe_random": 40.25, "finetune_mae": 50.0, "finetune_scratch": 41.0}

    def fake(name, cmd, stage_dir, env, done_file, reuse=True):
        calls.append((name, cmd))
        stage_dir.mkdir(parents=True, exist_ok=True)
        if name == "pretrain":
            (stage_dir / "encoder.safetensors").write_bytes(b"")
            (stage_dir / "config.yaml").write_text(
                "model: {name: mae_vit_tiny_patch4_dec128d2b, mask_ratio: 0.75}\ndata: {batch_size: 32}\n")
            rows = [{"step": s, "loss": 1.0 / s, "images_per_sec": 10.0 * s, "epoch": s / 10} for s in (1, 2, 3)]
            (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (stage_dir / "eval.json").write_text(json.dumps(
                {"top1": acc[name], "top5": 90.0, "n_images": 1000, "steps": 10, "global_batch": 32}))
        return {"stage": name, "command": shell_join(cmd), "seconds": 1.5, "returncode": 0,
                "reused": name == "probe_random"}

    return fake


def test_chain_wiring_and_results(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(chain_mod, "run_stage", _fake_run_stage(calls))
    docs = tmp_path / "docs"
    result = chain_mod.main(["--budget", "micro", "--work", str(tmp_path / "work"), "--docs", str(docs),
                             "--finetune-arg", "run.steps=3", "--threads", "3"])
    names = [n for n, _ in calls]
    assert names == ["pretrain", "probe_mae", "probe_random", "finetune_mae", "finetune_scratch"]
    cmds = {n: c for n, c in calls}
    variant = chain_mod.BUDGETS["micro"].variant
    encoder = str(tmp_path / "work" / "pretrain" / "encoder.safetensors")
    assert f"encoder={encoder}" in cmds["probe_mae"] and f"encoder={encoder}" in cmds["finetune_mae"]
    for key in ("probe_random", "finetune_scratch"):
        assert "encoder=random" in cmds[key] and f"arch={variant}" in cmds[key]
    assert cmds["finetune_mae"][1] == "finetune/classify.py" and cmds["probe_mae"][1] == "finetune/linprobe.py"
    assert "run.steps=3" in cmds["finetune_mae"] and "run.steps=3" in cmds["finetune_scratch"]
    assert "run.steps=3" not in cmds["probe_mae"]
    # both sides of each comparison get the same config file
    assert cmds["finetune_mae"][2] == cmds["finetune_scratch"][2] == "finetune/configs/cifar10_finetune_micro.yaml"

    assert result["command"].startswith("python recipes/cifar10/chain.py --budget micro")
    assert result["gaps"]["probe_top1_mae_minus_random"] == pytest.approx(5.25)
    assert result["gaps"]["finetune_top1_mae_minus_scratch"] == pytest.approx(9.0)
    assert result["pretrain"]["loss_curve"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3, abs=1e-5)]]
    assert result["pretrain"]["median_images_per_sec"] == 20.0
    assert result["hardware"]["threads"] == "3"  # what the stages got, not the parent's environment
    saved = json.loads((docs / "results" / "cifar10_micro.json").read_text())
    assert saved["pretrain"]["loss_curve"] == result["pretrain"]["loss_curve"]  # the compact curve reads back
    assert saved["runs"]["probe_mae"]["top1"] == 45.5
    with Image.open(docs / "results" / "cifar10_micro_pretrain_loss.png") as img:
        assert img.size == (900, 540)
    md = (docs / "RESULTS.md").read_text()
    assert "| linear probe, MAE encoder | 45.50 | 90.00 | 1,000 | 10 x 32 | 2 s |" in md
    assert "| fine-tune from scratch (random init) | 41.00 |" in md
    assert "**5.25 points**" in md and "**9.00 points**" in md
    assert "| probe_random | 2 s (reused) |" in md and "**Stages probe_random were reused" in md
    assert "![pretraining loss](results/cifar10_micro_pretrain_loss.png)" in md
    assert "UNMEASURED" in md and "$" not in md  # no gpu result yet; every placeholder filled

    # a gpu result replaces the 'unmeasured' section and is listed first
    gpu = dict(saved, budget="gpu", summary="gpu run")
    (docs / "results" / "cifar10_gpu.json").write_text(json.dumps(gpu))
    md = write_results_md(docs).read_text()
    assert "UNMEASURED" not in md
    assert md.index("## Budget `gpu`") < md.index("## Budget `micro`")


def test_results_md_is_the_template_rendering_of_the_stored_results(tmp_path):
    """docs/RESULTS.md is exactly what the template makes of docs/results/*.json (the chain writes both)."""
    (tmp_path / "results").mkdir()
    for pattern in ("cifar10_*.json", "*.md"):  # the chain's JSON, and the studies it appends as written
        for f in (REPO / "docs" / "results").glob(pattern):
            shutil.copy(f, tmp_path / "results" / f.name)
    assert write_results_md(tmp_path).read_text() == (REPO / "docs" / "RESULTS.md").read_text()


def test_fresh_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        chain_mod.main(["--budget", "micro", "--work", str(foreign), "--docs", str(tmp_path / "docs"), "--fresh"])
    assert exit_info.value.code == 2 and "did not create" in capsys.readouterr().err
    assert (foreign / "keep.txt").is_file()


# ------------------------------------------------------------------------------------------------- the real chain


@pytest.mark.slow
def test_micro_budget_end_to_end(tmp_path):
    """The documented command with size overrides only: every entry point really runs (2 steps each)."""
    cmd = [sys.executable, "recipes/cifar10/chain.py", "--budget", "micro", "--work", str(tmp_path / "work"),
           "--docs", str(tmp_path / "docs"), "--threads", "1", "--pretrain-arg", "run.steps=2",
           "--probe-arg", "run.steps=2", "--finetune-arg", "run.steps=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the checkout importable, as for the other subprocess tests
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "docs" / "results" / "cifar10_micro.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["pretrain", "probe_mae", "probe_random", "finetune_mae",
                                                      "finetune_scratch"]
    assert result["pretrain"]["steps"] == 2 and len(result["pretrain"]["loss_curve"]) == 2
    for run in result["runs"].values():
        assert 0.0 <= run["top1"] <= 100.0 and run["n_images"] == 1000  # the whole sample test split, once
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## Budget `micro`" in md
    assert f"| linear probe, MAE encoder | {result['runs']['probe_mae']['top1']:.2f} |" in md
    assert (tmp_path / "docs" / "results" / "cifar10_micro_pretrain_loss.png").is_file()
    # the same command again reuses every stage
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((tmp_path / "docs" / "results" / "cifar10_micro.json").read_text())
    assert all(s["reused"] for s in result["stages"])
