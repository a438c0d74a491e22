"""Evaluation: top-k against hand-worked examples, the valid mask, saved classifiers reloading to the same
predictions, evaluate.py agreeing with the runs' own eval.json (fine-tuned and probe), and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOWNSTREAM, N_TEST, TINY_ENC


def test_topk_hand_worked():
    from finetune.evaluation import AccuracyMeter, topk_correct

    logits = torch.tensor([[0.1, 0.9, 0.0],   # label 1: top-1 hit
                           [0.5, 0.2, 0.3],   # label 2: 2nd -> top-1 miss, top-2 hit
                           [0.2, 0.3, 0.5],   # label 0: 3rd
                           [9.0, 0.0, 0.0]])  # padding (invalid), would be a hit
    labels = torch.tensor([1, 2, 0, 0])
    hits = topk_correct(logits, labels, ks=(1, 2, 5))  # k=5 capped at 3 classes
    assert hits.tolist() == [[True, True, True], [False, True, True], [False, False, True], [True, True, True]]
    meter = AccuracyMeter(ks=(1, 2))
    meter.update(logits, labels, valid=torch.tensor([True, True, True, False]))
    out = meter.compute()
    assert out["n_images"] == 3 and out["top1"] == pytest.approx(100 / 3) and out["top2"] == pytest.approx(200 / 3)
    meter.update(logits[:1], torch.tensor([-1]), valid=torch.tensor([False]))  # padding: label -1, ignored
    assert meter.compute()["n_images"] == 3
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match="unlabelled"):
        meter.update(logits[:1], torch.tensor([-1]), valid=torch.tensor([True]))


def test_saved_classifier_reloads_with_same_predictions(tmp_path):
    from core.errors import WeightsError
    from finetune.export import save_classifier
    from launch.weights import classifier_model, read_weights
    from models.classifier import create_classifier

    def load_classifier(path):
        w = read_weights(str(path), want="classifier")
        return classifier_model(w), w.meta

    torch.manual_seed(0)
    model = create_classifier(TINY_ENC, 4, global_pool="avg").eval()
    torch.nn.init.normal_(model.head.weight)
    meta = {"kind": "vit", "encoder_cfg": TINY_ENC, "num_classes": 4, "pool": "avg", "img_size": 32,
            "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    save_classifier(model.state_dict(), tmp_path / "classifier_last.safetensors", meta)
    again, got_meta = load_classifier(tmp_path)  # a directory means its best/last weights
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert got_meta["pool"] == "avg" and not again.training
    # a classifier.json that does not fit the weights: an error naming the keys
    (tmp_path / "classifier.json").write_text(json.dumps({**meta, "encoder_cfg": {**TINY_ENC, "depth": 3}}))
    with pytest.raises(WeightsError, match=r"blocks\.2\."):
        load_classifier(tmp_path / "classifier_last.safetensors")
    (tmp_path / "classifier.json").write_text(json.dumps({**meta, "encoder_cfg": {**TINY_ENC, "embed_dim": 64,
                                                                                  "num_heads": 2}}))
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.qkv\.weight"):
        load_classifier(tmp_path / "classifier_last.safetensors")


def test_evaluate_matches_finetune_and_probe_runs(tiny):
    from finetune.classify import main as finetune
    from finetune.evaluate import main as evaluate
    from finetune.linprobe import main as linprobe

    common = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", *DOWNSTREAM, "optim.warmup_steps=1"]
    ft, lp = tiny["base"] / "ft", tiny["base"] / "lp"
    finetune(common + [f"run.output_dir={ft}", "run.steps=2", "run.eval_every=0", "run.save_every=0"])
    linprobe(common + [f"run.output_dir={lp}", "run.steps=6"])
    for run in (ft, lp):
        ev = json.loads((run / "eval.json").read_text())
        out = evaluate([f"checkpoint={run / 'classifier_last.safetensors'}", f"data.test={tiny['data']}:test",
                        "data.num_workers=0", "data.eval_batch=5", "run.progress=false"])
        assert out["n_images"] == N_TEST == ev["n_images"]
        assert out["top1"] == pytest.approx(ev["top1"]) and out["top5"] == pytest.approx(ev["top5"])
        assert out["loss"] == pytest.approx(ev["loss"], rel=1e-4)
        written = json.loads((run / "eval-classifier_last-test.json").read_text())
        assert written["top1"] == out["top1"] and written["kind"] in ("vit", "probe")
    # the command line, in a fresh process without a launcher
    import os
    import subprocess
    import sys

    from helpers_launch import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "finetune" / "evaluate.py"), f"checkpoint={ft}",
                           f"data.test={tiny['data']}:test", "data.num_workers=0", "run.progress=false",
                           f"output={ft / 'cli.json'}"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((ft / "cli.json").read_text())
    saved = json.loads((ft / "eval.json").read_text())
    assert cli["n_images"] == N_TEST and cli["top1"] == pytest.approx(saved["top1"])


def test_evaluate_errors(tiny):
    from core.errors import UserError
    from finetune.classify import main as finetune
    from finetune.evaluate import main as evaluate
    from launch.config import ConfigError

    run = tiny["base"] / "ft_err"
    finetune([f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", *DOWNSTREAM, f"run.output_dir={run}",
              "run.steps=1", "run.eval_every=0", "run.save_every=0", "optim.warmup_steps=0"])
    with pytest.raises(ConfigError, match="no labels"):
        evaluate([f"checkpoint={run}", f"data.test={tiny['data']}:nolabels", "data.num_workers=0",
                  "run.progress=false"])
    with pytest.raises(UserError, match="no such file"):
        evaluate([f"checkpoint={run / 'nope.safetensors'}", f"data.test={tiny['data']}:test"])
    from finetune.export import save_classifier
    from models.classifier import create_classifier

    four = tiny["base"] / "four"  # a 4-class classifier against the 3-class split
    save_classifier(create_classifier(TINY_ENC, 4).state_dict(), four / "classifier_best.safetensors",
                    {"kind": "vit", "encoder_cfg": TINY_ENC, "num_classes": 4, "img_size": 32, "mean": [0.5] * 3,
                     "std": [0.5] * 3})
    with pytest.raises(ConfigError, match="4 classes but .* has 3"):
        evaluate([f"checkpoint={four}", f"data.test={tiny['data']}:test", "data.num_workers=0", "run.progress=false"])


def test_evaluate_counts_undecodable_images(tiny, tmp_path, capsys):
    """An image of the split that does not decode is not silently dropped: eval.json and the printout say
    n_images + n_corrupt = the split's size."""
    import io
    import shutil
    import tarfile

    from finetune.classify import main as finetune
    from finetune.evaluate import main as evaluate

    broken = tmp_path / "data"
    shutil.copytree(tiny["data"], broken)
    shard = sorted(broken.glob("test-*.tar*"))[0]
    mode = "gz" if shard.name.endswith(".gz") else ""
    with tarfile.open(shard, f"r:{mode}") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_jpg = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, f"w:{mode}") as tar:
        for member, data in members:
            data = b"not a jpeg" if member.name == first_jpg else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    run = tiny["base"] / "ft_corrupt"
    finetune([f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", *DOWNSTREAM, "optim.warmup_steps=1",
              f"run.output_dir={run}", "run.steps=1", "run.eval_every=0", "run.save_every=0"])
    capsys.readouterr()
    out = evaluate([f"checkpoint={run}", f"data.test={broken}:test", "data.num_workers=0", "run.progress=false"])
    assert out["n_corrupt"] == 1 and out["n_images"] == N_TEST - 1
    written = json.loads(next(run.glob("eval-*-test.json")).read_text())
    assert written["n_corrupt"] == 1
    assert f"WARNING: 1 images of {broken}:test could not be decoded" in capsys.readouterr().out
