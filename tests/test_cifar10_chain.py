"""Tests of the CIFAR-10 chain (recipes/cifar10/chain.py, shards.py, chain_report.py) and the recipe plumbing it
stands on (recipes/stages.py, record.py, page.py, loss_plot.py): stage running and reuse, commands written
without the machine's folders, the page's marked blocks, data helpers, the stage wiring (with the entry points
replaced by a stub that writes what they write), the results page rendered from the stored records, the loss-curve
chart, and the micro budget run end to end as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from recipes.cifar10 import chain as chain_mod
from recipes.cifar10 import objectives as study_mod
from recipes.cifar10 import options
from recipes.cifar10 import shards as shards_mod
from recipes.cifar10.shards import TARBALL_ENV, class_subset, ensure_cifar
from recipes.loss_plot import draw_loss_curve, loss_figure, moving_average
from recipes.page import write_blocks
from recipes.stages import REPO, InputError, StageError, public, run_stage, shell_join

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
    assert "hello" in (tmp_path / "demo" / "stage.log").read_text()
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
    (tmp_path / "demo" / "stage.json").write_text(json.dumps({"command": shell_join(cmd2), "returncode": None}))
    (tmp_path / "demo" / "checkpoint").write_text("resume me")
    assert not run_stage("demo", cmd2, tmp_path / "demo", {}, done)["reused"]
    assert (tmp_path / "demo" / "checkpoint").is_file()
    with pytest.raises(StageError, match=r"stage 'bad' failed with exit code 3"):
        run_stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad", {}, None)
    with pytest.raises(StageError, match="did not write"):
        run_stage("lazy", [sys.executable, "-c", "pass"], tmp_path / "lazy", {}, tmp_path / "never.txt")


def test_recorded_commands_name_no_folder_of_the_machine(tmp_path):
    work, cifar = tmp_path / "w", tmp_path / "c"
    cmd = shell_join([sys.executable, "pretrain/mae.py", f"data.train={work}/shards", f"run.output_dir={work}/pre",
                      f"--input={cifar}/train", f"vis.images={REPO}/data/sample:test"])
    assert public(cmd, {"WORK": work, "CIFAR_DIR": cifar}) == ("python pretrain/mae.py data.train=WORK/shards "
                                                               "run.output_dir=WORK/pre --input=CIFAR_DIR/train "
                                                               "vis.images=data/sample:test")
    args = SimpleNamespace(argv=["--budget", "cpu", "--work", str(work), f"--cifar-dir={cifar}", "--threads", "2"],
                           work=str(work), cifar_dir=str(cifar), docs=str(REPO / "docs"), tarball=None)
    header = options.header("recipes/cifar10/chain.py", args, {"OMP_NUM_THREADS": "2"}, "then", 0.0, name="x")
    assert header["command"] == "python recipes/cifar10/chain.py --budget cpu --work WORK --cifar-dir=CIFAR_DIR " \
                                "--threads 2"
    assert header["name"] == "x" and header["threads"] == "2" and header["started"] == "then"


def test_a_relative_path_in_the_recipe_command_is_recorded_by_its_name(tmp_path, monkeypatch):
    """A tarball or folder given relative to the current directory (`--tarball ../x.tar.gz`, `--work=w`) is
    recorded by its name, as an absolute one is."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    args = SimpleNamespace(argv=["--tarball", "../c.tar.gz", "--work=w", "--threads", "2"], work="w",
                           cifar_dir=str(tmp_path / "c"), docs=None, tarball="../c.tar.gz")
    header = options.header("recipes/cifar10/chain.py", args, {}, "then", 0.0)
    assert header["command"] == "python recipes/cifar10/chain.py --tarball TARBALL --work=WORK --threads 2"


def test_page_blocks_are_replaced_in_place_appended_when_new_and_prose_kept(tmp_path):
    page = tmp_path / "PAGE.md"
    page.write_text("# Title\n\nHand-written prose.\n<!-- tessera:begin a -->\nold a\n<!-- tessera:end a -->\n\n"
                    "More prose.\n")
    write_blocks(page, {"a": "new a\nsecond line", "b": "| b |"})
    assert page.read_text() == ("# Title\n\nHand-written prose.\n<!-- tessera:begin a -->\nnew a\nsecond line\n"
                                "<!-- tessera:end a -->\n\nMore prose.\n\n<!-- tessera:begin b -->\n| b |\n"
                                "<!-- tessera:end b -->\n")
    write_blocks(page, {"b": "| b2 |"})  # the appended block now updates in place
    assert page.read_text().endswith("More prose.\n\n<!-- tessera:begin b -->\n| b2 |\n<!-- tessera:end b -->\n")
    page.write_text("<!-- tessera:begin a -->\nno end\n")
    with pytest.raises(ValueError, match="without its"):
        write_blocks(page, {"a": "x"})
    assert write_blocks(tmp_path / "new" / "P.md", {"c": "c"}).read_text() == ("<!-- tessera:begin c -->\nc\n"
                                                                               "<!-- tessera:end c -->\n")


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
    with pytest.raises(InputError, match="fewer than the 5"):
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
    with pytest.raises(InputError, match=rf"tarball not found.*--tarball PATH or set {TARBALL_ENV}"):
        ensure_cifar(tmp_path / "missing.tar.gz", tmp_path / "elsewhere")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    with pytest.raises(InputError, match="does not hold train/ and test/"):
        ensure_cifar(bad, tmp_path / "cifar_bad")


def test_tarball_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tiny_tree(src / "train")
    _tiny_tree(src / "test")
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")
    monkeypatch.setenv(TARBALL_ENV, str(tmp_path / "c.tar.gz"))

    def stop(name, *args, **kwargs):
        raise StageError(f"stopped before {name}")

    monkeypatch.setattr(shards_mod, "run_stage", stop)  # no shards from these fake JPEGs: the unpack is what counts
    with pytest.raises(SystemExit, match="stopped before shards:train"):
        chain_mod.main(["--budget", "cpu", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"),
                        "--cifar-dir", str(tmp_path / "cifar")])
    assert (tmp_path / "cifar" / "train" / "a" / "0000.jpg").is_file()


def test_missing_tarball_is_one_line_naming_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TARBALL_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        chain_mod.main(["--budget", "cpu", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"),
                        "--tarball", str(tmp_path / "nope.tar.gz"), "--cifar-dir", str(tmp_path / "cifar")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recipes/cifar10/chain.py: error: CIFAR-10 tarball not found") and err.count("\n") == 1
    assert "--tarball" in err and TARBALL_ENV in err


# ------------------------------------------------------------------------------------------------- wiring + document

PROVENANCE = {"git": {"commit": "abcdef0123456789", "dirty": True}, "packages": {"torch": "9.9", "timm": "8.8"},
              "hardware": {"host": "secret-host", "cpu": "Test CPU", "cpu_cores": 3, "memory_gb": 7.5, "gpus": []}}
ACCURACY = {"probe_mae": 45.5, "probe_random": 40.25, "probe_pixels": 38.0, "attentive_mae": 52.0,
            "attentive_random": 44.0, "attentive_pixels": 39.5, "finetune_mae": 50.0, "finetune_scratch": 41.0}


def _fake_run_stage(calls):
    """Stands in for the entry points: writes the files each one writes (run.json, config.yaml, metrics.jsonl,
    eval.json), with made-up numbers."""

    def fake(name, cmd, stage_dir, env, done_file, reuse=True):
        calls.append((name, cmd))
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "run.json").write_text(json.dumps({**PROVENANCE, "status": "finished", "global_batch": 32,
                                                        "command": ["/machine/python", *cmd[1:]]}))
        if name == "pretrain":
            (stage_dir / "encoder.safetensors").write_bytes(b"")
            (stage_dir / "config.yaml").write_text(yaml.safe_dump(
                {"model": {"name": "mae_vit_tiny_patch4_dec128d2b", "mask_ratio": 0.75, "norm_pix_loss": True,
                           "pool": "token"}}))
            rows = [{"step": s, "loss": 1.0 / s, "images_per_sec": 10.0 * s, "epoch": s / 10} for s in (1, 2, 3)]
            rows[0].update(knn_top1_init=0.25, knn_top1_pixels=0.3)
            rows[-1]["knn_top1"] = 0.4
            (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (stage_dir / "eval.json").write_text(json.dumps(
                {"top1": ACCURACY[name], "top5": 90.0, "n_images": 1000, "steps": 10, "global_batch": 32}))
        return {"stage": name, "command": shell_join(cmd), "seconds": 1.5, "returncode": 0,
                "reused": name == "probe_random"}

    return fake


def test_chain_wiring_and_results(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(chain_mod, "run_stage", _fake_run_stage(calls))
    docs, work = tmp_path / "docs", tmp_path / "work"
    record = chain_mod.main(["--budget", "micro", "--work", str(work), "--docs", str(docs), "--finetune-arg",
                             "run.steps=3", "--threads", "3"])
    assert [n for n, _ in calls] == list(chain_mod.RUNS)
    cmds = {n: c for n, c in calls}
    variant, sample = chain_mod.BUDGETS["micro"][0], REPO / "data" / "sample"
    encoder = f"encoder={work / 'pretrain' / 'encoder.safetensors'}"
    assert cmds["pretrain"][1:4] == ["pretrain/mae.py", "pretrain/configs/cifar10_micro.yaml", f"data.train={sample}"]
    assert encoder in cmds["probe_mae"] and encoder in cmds["finetune_mae"]
    for key in ("probe_random", "attentive_random", "finetune_scratch"):
        assert "encoder=random" in cmds[key] and f"arch={variant}" in cmds[key]
    for key in ("probe_pixels", "attentive_pixels"):
        assert "encoder=pixels" in cmds[key] and f"arch={variant}" in cmds[key]
    # the attentive probe: the documented head file, then the budget's file, for all three feature sources
    for key in ("attentive_mae", "attentive_random", "attentive_pixels"):
        assert cmds[key][1:4] == ["finetune/linprobe.py", "finetune/configs/probe_attentive.yaml",
                                  "finetune/configs/cifar10_attentive_micro.yaml"]
    assert f"data.train={sample}:train" in cmds["probe_mae"] and f"data.train={sample}" in cmds["finetune_mae"]
    assert cmds["finetune_mae"][1] == "finetune/classify.py" and cmds["probe_mae"][1] == "finetune/linprobe.py"
    assert "run.steps=3" in cmds["finetune_mae"] and "run.steps=3" in cmds["finetune_scratch"]
    assert "run.steps=3" not in cmds["probe_mae"]
    # both sides of each comparison get the same config file
    assert cmds["finetune_mae"][2] == cmds["finetune_scratch"][2] == "finetune/configs/cifar10_finetune_micro.yaml"

    saved = json.loads((docs / "results" / "cifar10_micro.json").read_text())
    assert saved == json.loads(json.dumps(record))  # the compact loss curve reads back
    assert saved["command"] == "python recipes/cifar10/chain.py --budget micro --work WORK --docs DOCS " \
                               "--finetune-arg run.steps=3 --threads 3"
    assert saved["threads"] == "3"  # what the stages got, not the parent's environment
    # provenance from the pretraining's run.json, without the host name; commands without the machine's folders
    assert saved["provenance"]["git"] == PROVENANCE["git"] and "host" not in saved["provenance"]["hardware"]
    pretrain = saved["stages"][0]
    assert pretrain["command"].startswith("python pretrain/mae.py pretrain/configs/cifar10_micro.yaml "
                                          "data.train=data/sample run.output_dir=WORK/pretrain")
    assert pretrain["metrics"]["loss_curve"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3, abs=1e-5)]]
    assert pretrain["metrics"]["images_per_sec"] == 20.0 and pretrain["model"]["name"] == variant
    assert saved["stages"][1]["eval"]["top1"] == 45.5
    assert str(tmp_path) not in json.dumps(saved)
    with Image.open(docs / "results" / "cifar10_micro_pretrain_loss.png") as img:
        assert img.size == (900, 540)

    md = (docs / "RESULTS.md").read_text()
    assert md.startswith("<!-- tessera:begin cifar10_micro -->\n## Budget `micro`: smoke test")
    assert "commit `abcdef0` (plus changes not yet committed).\nMachine: Test CPU, 3 cores, 7.5 GB memory, " \
           "no GPU;" in md
    assert "OMP_NUM_THREADS=3;\nPython 3." in md and "torch 9.9, timm 8.8." in md
    assert "| linear probe, MAE encoder | 45.50 | 90.00 | 1,000 | 10 x 32 | 2 s |" in md
    assert "| fine-tune from scratch (random init) | 41.00 |" in md
    # the three yardsticks side by side: k-NN from the pretraining's log (fractions shown as %), both probes
    assert "| MAE encoder | 40.00 | 45.50 | 52.00 |" in md
    assert "| random encoder (at init) | 25.00 | 40.25 | 44.00 |" in md
    assert "| raw pixels | 30.00 | 38.00 | 39.50 |" in md
    assert "**5.25 points**" in md and "**9.00 points**" in md
    assert "3 steps of 32 images\n(0.30 epochs), loss 1.0000 at the first logged step -> 0.3333 at the" in md
    assert "| probe_random | 2 s (reused) |" in md and "**Stages probe_random were reused" in md
    assert "![pretraining loss](results/cifar10_micro_pretrain_loss.png)" in md and "{" not in md


def test_results_page_is_what_the_writers_render_from_the_stored_records(tmp_path):
    """docs/RESULTS.md's generated blocks are exactly what the two report writers make of docs/results/*.json (through
    the recipes' --render-only), and the prose around them stays as written."""
    (tmp_path / "results").mkdir()
    shutil.copy(REPO / "docs" / "RESULTS.md", tmp_path / "RESULTS.md")
    for f in (REPO / "docs" / "results").glob("*.json"):
        shutil.copy(f, tmp_path / "results" / f.name)
    assert chain_mod.main(["--render-only", "--docs", str(tmp_path)]) is None  # as documented, pictures redrawn
    assert study_mod.main(["--render-only", "--docs", str(tmp_path)]) is None
    stored = (REPO / "docs" / "RESULTS.md").read_text()
    assert (tmp_path / "RESULTS.md").read_text() == stored
    for picture in ("cifar10_cpu_pretrain_loss.png", "objectives_cpu.png"):
        with Image.open(tmp_path / "results" / picture) as img, Image.open(REPO / "docs" / "results" / picture) as ref:
            assert img.size == ref.size
    assert "1,800 steps of 64 images\n(2.30 epochs)" in stored  # the pretraining's global batch, from its record
    for folder in ("/tmp/", f"{REPO.parent}/", "../"):  # no folder of the machine, none outside the repository
        assert folder not in stored


def test_fresh_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        chain_mod.main(["--budget", "micro", "--work", str(foreign), "--docs", str(tmp_path / "docs"), "--fresh"])
    assert exit_info.value.code == 2 and "no recipe created" in capsys.readouterr().err
    assert (foreign / "keep.txt").is_file()


# ------------------------------------------------------------------------------------------------- the real chain


@pytest.mark.slow
def test_micro_budget_end_to_end(tmp_path):
    """The documented command with size overrides only: every entry point really runs (2 steps each), the record is
    read from the runs' own files, and the same command again reuses every stage."""
    cmd = [sys.executable, "recipes/cifar10/chain.py", "--budget", "micro", "--work", str(tmp_path / "work"),
           "--docs", str(tmp_path / "docs"), "--threads", "1", "--pretrain-arg", "run.steps=2",
           "--probe-arg", "run.steps=2", "--finetune-arg", "run.steps=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the checkout importable, as for the other subprocess tests
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "docs" / "results" / "cifar10_micro.json").read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == list(chain_mod.RUNS)
    pretrain = stages["pretrain"]
    assert pretrain["run"]["status"] == "finished" and pretrain["run"]["global_batch"] == 32  # cifar10_micro.yaml
    assert pretrain["metrics"]["steps"] == 2 and len(pretrain["metrics"]["loss_curve"]) == 2
    assert len(record["provenance"]["git"]["commit"]) == 40 and record["provenance"]["packages"]["torch"]
    for key in chain_mod.RUNS[1:]:
        assert 0.0 <= stages[key]["eval"]["top1"] <= 100.0 and stages[key]["eval"]["n_images"] == 1000  # all of test
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## Budget `micro`" in md and "2 steps of 32 images" in md
    assert f"| linear probe, MAE encoder | {stages['probe_mae']['eval']['top1']:.2f} |" in md
    assert (tmp_path / "docs" / "results" / "cifar10_micro_pretrain_loss.png").is_file()
    assert str(tmp_path) not in md
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((tmp_path / "docs" / "results" / "cifar10_micro.json").read_text())
    assert all(s["reused"] for s in record["stages"])
