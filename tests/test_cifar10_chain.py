"""Tests of launch/cifar10_chain.py and the modules it uses (chain_stages, chain_data, results_doc, loss_plot) without
training: stage running and reuse, data helpers, the stage wiring (with the entry points replaced by a stub), the
results table and the hand-drawn loss-curve PNG."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from launch import cifar10_chain as chain_mod
from launch.chain_data import class_subset, ensure_cifar
from launch.chain_stages import ChainError, run_stage, shell_join
from launch.loss_plot import draw_loss_curve, moving_average, nice_step, nice_ticks, tick_label
from launch.results_doc import write_results_md


# ------------------------------------------------------------------------------------------------- ticks, averages


def test_nice_ticks_hand_worked():
    assert nice_ticks(0, 1, 5) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # span 2.24 / 6 = 0.373 -> step 0.5; floor(0.53/0.5)=1, ceil(2.77/0.5)=6
    assert nice_ticks(0.53, 2.77, 6) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    # 1000 / 8 = 125 -> 200
    assert nice_step(1000, 8) == 200
    assert nice_ticks(0, 1000, 8) == [0, 200, 400, 600, 800, 1000]
    # a flat series still gets a range around its value
    flat = nice_ticks(2.0, 2.0)
    assert flat[0] < 2.0 < flat[-1]


def test_tick_labels():
    assert tick_label(1200.0, 200.0) == "1,200"
    assert tick_label(0.5, 0.1) == "0.5"
    assert tick_label(0.05, 0.05) == "0.05"


def test_moving_average_hand_worked():
    # half-width 1: (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4)/2
    assert moving_average([1.0, 2.0, 3.0, 4.0], 1) == pytest.approx([1.5, 2.0, 3.0, 3.5])
    assert moving_average([3.0, 1.0], 0) == [3.0, 1.0]


# ------------------------------------------------------------------------------------------------- loss curve PNG


def test_loss_curve_line_lands_where_the_axes_say(tmp_path):
    # x ticks 0..100 (step 20), y ticks 0..1 (step 0.2); plot area x 92..876, y 46..470 for a 900x540 image
    path = draw_loss_curve([[0, 0.0], [100, 1.0]], tmp_path / "c.png", title="t")
    img = Image.open(path).convert("RGB")
    assert img.size == (900, 540)
    # the point (25, 0.25) of the line: x 92 + 0.25 * 784 = 288, y 470 - 0.25 * 424 = 364 (y grows downwards)
    x_q, y_q = 288, 364

    def blue(px):
        r, g, b = px
        return b > 150 and r < 120

    def near(x, y):
        return [img.getpixel((x + dx, y + dy)) for dx in range(-2, 3) for dy in range(-3, 4)]

    assert any(blue(p) for p in near(x_q, y_q))
    assert not any(blue(p) for p in near(x_q, 46 + 470 - y_q))  # where a flipped y axis would put it
    # nothing blue far away from the line (e.g. the lower right of the plot area)
    assert not any(blue(img.getpixel((800 + dx, 420 + dy))) for dx in range(5) for dy in range(5))


def test_loss_curve_skips_nan_and_handles_empty(tmp_path):
    p = draw_loss_curve([[1, float("nan")], [2, 0.5], [3, 0.4]], tmp_path / "a.png")
    assert Image.open(p).size == (900, 540)
    p = draw_loss_curve([], tmp_path / "b.png")
    assert p.is_file()


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
    with pytest.raises(ChainError, match="tarball not found"):
        ensure_cifar(tmp_path / "missing.tar.gz", tmp_path / "elsewhere")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    with pytest.raises(ChainError, match="does not hold train/ and test/"):
        ensure_cifar(bad, tmp_path / "cifar_bad")


# ------------------------------------------------------------------------------------------------- wiring + table


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
                "reused": False}

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
    assert "run.steps=3" in cmds["finetune_mae"] and "run.steps=3" in cmds["finetune_scratch"]
    assert "run.steps=3" not in cmds["probe_mae"]
    # both sides of each comparison get the same config file
    assert cmds["finetune_mae"][2] == cmds["finetune_scratch"][2] == "finetune/configs/cifar10_finetune_micro.yaml"

    assert result["gaps"]["probe_top1_mae_minus_random"] == pytest.approx(5.25)
    assert result["gaps"]["finetune_top1_mae_minus_scratch"] == pytest.approx(9.0)
    assert result["pretrain"]["loss_curve"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3, abs=1e-5)]]
    assert result["pretrain"]["median_images_per_sec"] == 20.0
    assert result["hardware"]["threads"] == "3"  # what the stages got, not the parent's environment
    saved = json.loads((docs / "results" / "cifar10_micro.json").read_text())
    assert saved["pretrain"]["loss_curve"] == result["pretrain"]["loss_curve"]  # the compact curve reads back
    assert saved["runs"]["probe_mae"]["top1"] == 45.5
    assert (docs / "results" / "cifar10_micro_pretrain_loss.png").is_file()
    md = (docs / "RESULTS.md").read_text()
    assert "| linear probe, MAE encoder | 45.50 |" in md
    assert "| fine-tune from scratch (random init) | 41.00 |" in md
    assert "**5.25 points**" in md and "**9.00 points**" in md
    assert "UNMEASURED" in md  # no gpu result yet

    # a gpu result replaces the 'unmeasured' section and is listed first
    gpu = dict(saved, budget="gpu", summary="gpu run")
    (docs / "results" / "cifar10_gpu.json").write_text(json.dumps(gpu))
    md = write_results_md(docs).read_text()
    assert "UNMEASURED" not in md
    assert md.index("## Budget `gpu`") < md.index("## Budget `micro`")


def test_fresh_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="did not create"):
        chain_mod.main(["--budget", "micro", "--work", str(foreign), "--docs", str(tmp_path / "docs"), "--fresh"])
    assert (foreign / "keep.txt").is_file()
