"""The k-NN monitor's baselines and its class check: raw-pixel features against hand-written block means; both
baselines against an independent float64 recomputation; the run-directory cache (written once, read on resume,
not used for another setup) on 1 and 2 processes; the end-of-run line; bank and queries with other class names
refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import CLASSES, TINY_ENC, make_tiny_dataset
from helpers_launch import ROOT, launch_two
from test_knn import brute_force_scores

from core.errors import ConfigError
from data.info import DatasetInfo
from launch.knn_monitor import PIXEL_POOL, build_knn_monitor, check_same_classes, knn_summary, pixel_features

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("baselines") / "data")  # train 30 (3 shards), test 13 (5/5/3)


def block_means(images: torch.Tensor, cells: int) -> torch.Tensor:
    """Float64, by loops: each channel cut into cells x cells equal blocks, each block's mean, row-major per channel."""
    n, c, h, w = images.shape
    bh, bw = h // cells, w // cells
    out = torch.zeros(n, c * cells * cells, dtype=torch.float64)
    for i in range(n):
        for ch in range(c):
            for r in range(cells):
                for q in range(cells):
                    block = images[i, ch, r * bh:(r + 1) * bh, q * bw:(q + 1) * bw].double()
                    out[i, ch * cells * cells + r * cells + q] = block.sum() / (bh * bw)
    return out


@pytest.mark.parametrize("size", [32, 24, 64])
def test_pixel_features_are_block_means_of_a_fixed_grid(size):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    got = pixel_features(images)
    assert got.shape == (2, 3 * PIXEL_POOL ** 2) and got.dtype == torch.float32  # the same length at any size
    torch.testing.assert_close(got.double(), block_means(images, PIXEL_POOL), rtol=1e-6, atol=1e-6)


def test_summary_line():
    assert knn_summary(0.342, 0.281, 0.312) == ("knn_top1 0.342: +6.1 points over the encoder at init (0.281), "
                                                "+3.0 over raw pixels (0.312)")
    assert knn_summary(0.25, 0.281, 0.312) == ("knn_top1 0.250: 3.1 points below the encoder at init (0.281), "
                                               "6.2 below raw pixels (0.312)")
    assert knn_summary(0.3, None, 0.25) == "knn_top1 0.300: +5.0 points over raw pixels (0.250)"
    assert knn_summary(0.3, None, None) == "knn_top1 0.300 (no baselines)"
    assert knn_summary(0.3, 0.3, None) == "knn_top1 0.300: +0.0 points over the encoder at init (0.300)"


def test_class_names_that_differ_are_refused_in_one_line():
    bank = DatasetInfo(urls=["a"], num_classes=3, class_names=["cat", "dog", "frog"])
    check_same_classes(bank, DatasetInfo(urls=["b"], num_classes=3, class_names=["cat", "dog", "frog"]), "A", "B")
    check_same_classes(bank, DatasetInfo(urls=["b"], num_classes=3), "A", "B")  # no names to compare: counts agree
    with pytest.raises(ConfigError) as info:
        check_same_classes(bank, DatasetInfo(urls=["b"], num_classes=3, class_names=["cat", "truck", "ship"]),
                           "data/x (train)", "data/y:test")
    msg = str(info.value)
    assert "\n" not in msg and "data/x (train)" in msg and "data/y:test" in msg
    assert "label 1 is 'dog' in the bank but 'truck' in the queries" in msg
    with pytest.raises(ConfigError, match="has 3 classes but the queries data/y:test 2"):
        check_same_classes(bank, DatasetInfo(urls=["b"], num_classes=2), "data/x (train)", "data/y:test")


def test_the_monitor_refuses_a_query_split_with_other_class_names(tiny_data, tmp_path):
    other = shutil.copytree(tiny_data, tmp_path / "other")
    meta = json.loads((other / "dataset.json").read_text())
    meta["splits"]["test"]["class_names"] = [CLASSES[0], "ship", CLASSES[2]]  # same count, label 1 means another class
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="label 1 is 'automobile' in the bank but 'ship' in the queries"):
        monitor_on(tiny_data, None, query=f"{other}:test")


def tiny_encoder(seed: int = 0):
    from models.vit import create_encoder

    torch.manual_seed(seed)
    return create_encoder(**TINY_ENC).eval()


def monitor_on(data, encoder, accelerator=None, query=None, k=20):
    from accelerate import Accelerator

    monitor, note = build_knn_monitor(bank=None, query=query, train=str(data), accelerator=accelerator or Accelerator(
        cpu=True), encoder=lambda: encoder, img_size=32, mean=MEAN, std=STD, bank_size=20, query_size=10,
        batch_size=4, num_workers=0, k=k)
    assert monitor is not None, note
    return monitor


def reference_features(data, encoder) -> tuple[dict, list]:
    """Own loaders, own features: {"init": [bank, query] CLS tokens, "pixels": [bank, query] hand-pooled}, labels."""
    from data.device_input import device_batches
    from data.eval_stream import build_eval_loader
    from data.info import resolve
    from data.transforms import eval_transform
    from launch.knn_monitor import subset

    feats = {"init": [], "pixels": []}
    labels = []
    for split, n in (("train", 20), ("test", 10)):
        loader = build_eval_loader(subset(resolve(f"{data}:{split}"), n), batch_size=5,
                                   transform=eval_transform(32, MEAN, STD))
        e, p, y = [], [], []
        with torch.no_grad():
            for batch in device_batches(loader, "cpu", mean=MEAN, std=STD):
                valid = batch["valid"]
                e.append(encoder.forward_features(batch["image"])[:, 0][valid])
                p.append(block_means(batch["image"][valid], PIXEL_POOL))
                y.append(batch["label"][valid])
        feats["init"].append(torch.cat(e))
        feats["pixels"].append(torch.cat(p))
        labels.append(torch.cat(y))
    return feats, labels


def reference_baselines(data, encoder, k=20) -> dict:
    """Both baselines from scratch: `reference_features` and a float64 k-NN."""
    feats, labels = reference_features(data, encoder)
    out = {}
    for name, (bank, query) in feats.items():
        scores = brute_force_scores(bank, labels[0], query, 3, k, 0.07)
        out[f"knn_top1_{name}"] = (scores.argmax(1) == labels[1]).double().mean().item()
    return out


def test_pixel_rows_are_the_hand_pooled_normalised_images(tiny_data):
    feats, labels = reference_features(tiny_data, tiny_encoder())
    bank_x, bank_y, query_x, query_y = monitor_on(tiny_data, None).pixel_rows()
    assert bank_x.shape == (20, 3 * PIXEL_POOL ** 2) and query_x.shape == (10, 3 * PIXEL_POOL ** 2)
    torch.testing.assert_close(bank_x.double(), feats["pixels"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(query_x.double(), feats["pixels"][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(bank_y, labels[0]) and torch.equal(query_y, labels[1])


def test_baselines_are_computed_once_cached_and_read_on_resume(tiny_data, tmp_path):
    encoder = tiny_encoder()
    reference = reference_baselines(tiny_data, encoder)
    monitor = monitor_on(tiny_data, encoder)
    rng = torch.get_rng_state()
    got = monitor.baselines(tmp_path, encoder)
    assert torch.equal(torch.get_rng_state(), rng)  # the training streams do not move
    assert got == pytest.approx(reference, abs=1e-12)
    blob = json.loads((tmp_path / "knn_baselines.json").read_text())
    assert blob["knn_top1_init"] == got["knn_top1_init"] and blob["knn_top1_pixels"] == got["knn_top1_pixels"]
    assert {k: blob["setup"][k] for k in ("bank_size", "query_size", "k", "temperature", "pool", "pixel_pool")} == {
        "bank_size": 20, "query_size": 10, "k": 20, "temperature": 0.07, "pool": "token", "pixel_pool": PIXEL_POOL}
    # the hook now also reports the gain over the encoder at init
    step = monitor(1)
    assert monitor.last_top1 == step["knn_top1"]
    assert step["knn_gain_init"] == pytest.approx(step["knn_top1"] - got["knn_top1_init"], abs=1e-15)

    # a resumed run (no encoder at init) reads the file: marked values come back, nothing is recomputed
    blob.update(knn_top1_init=0.5, knn_top1_pixels=0.25)
    (tmp_path / "knn_baselines.json").write_text(json.dumps(blob))
    resumed = monitor_on(tiny_data, tiny_encoder(seed=1))
    assert resumed.baselines(tmp_path, None) == {"knn_top1_init": 0.5, "knn_top1_pixels": 0.25}
    assert resumed.init_top1 == 0.5

    # another k-NN setup: the file does not answer; pixels are recomputed, the init value is unknown
    other_k = monitor_on(tiny_data, tiny_encoder(seed=1), k=5)
    assert other_k.baselines(tmp_path, None) == pytest.approx(
        {"knn_top1_init": None, "knn_top1_pixels": reference_baselines(tiny_data, encoder, k=5)["knn_top1_pixels"]},
        abs=1e-12)
    assert "knn_gain_init" not in other_k(1)
    rewritten = json.loads((tmp_path / "knn_baselines.json").read_text())
    assert rewritten["setup"]["k"] == 5 and rewritten["knn_top1_init"] is None
    assert "at init is gone" in rewritten["note"]

    # a fresh run always recomputes (a directory reused with run.overwrite keeps no stale value)
    assert monitor.baselines(tmp_path, encoder) == pytest.approx(reference, abs=1e-12)


def test_baselines_on_two_ranks_are_one_process_values_on_every_rank(tiny_data, tmp_path):
    encoder_path = tmp_path / "encoder.pt"
    torch.save(tiny_encoder().state_dict(), encoder_path)
    run_dir = tmp_path / "run"
    script = f"""
import sys; sys.path.insert(0, {str(ROOT / "tests")!r})
import json, torch
from accelerate import Accelerator
from test_knn_baselines import monitor_on, tiny_encoder
acc = Accelerator()
enc = tiny_encoder(seed=3)
enc.load_state_dict(torch.load({str(encoder_path)!r}, weights_only=True))
fresh = monitor_on({str(tiny_data)!r}, enc, acc).baselines({str(run_dir)!r}, enc)
resumed = monitor_on({str(tiny_data)!r}, enc, acc).baselines({str(run_dir)!r}, None)
with open({str(tmp_path)!r} + f"/rank{{acc.process_index}}.json", "w") as fh:
    json.dump({{"fresh": fresh, "resumed": resumed}}, fh)
"""
    launch_two(script, tmp_path)
    reference = reference_baselines(tiny_data, tiny_encoder())
    written = json.loads((run_dir / "knn_baselines.json").read_text())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["fresh"] == pytest.approx(reference, abs=1e-12)
        assert got["resumed"] == got["fresh"]
        assert {k: written[k] for k in got["fresh"]} == got["fresh"]
    assert not list(run_dir.glob("*.tmp*"))
