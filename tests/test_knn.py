"""The live k-NN monitor: the weighted k-NN classifier against a brute-force float64 one, the deterministic subsets,
and the monitor in tiny pretraining runs (1 and 2 processes): knn_top1 in the step's metrics record, equal to a
recomputation from the exported encoder; off with a note without labels; a named split that is missing is a user
error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_MODEL, make_tiny_dataset
from helpers_launch import launch_two

from launch.knn import knn_scores, knn_top1
from launch.knn_monitor import subset
from launch.metrics import read_metrics


def brute_force_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Float64, one query and one bank row at a time: sort by cosine, sum exp(cos / T) per class of the k first."""
    bank = [b / b.norm() for b in bank.double()]
    out = []
    for q in queries.double():
        q = q / q.norm()
        nearest = sorted(((float(q @ b), i) for i, b in enumerate(bank)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, i in nearest:
            votes[int(bank_labels[i])] += math.exp(sim / temperature)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,chunk", [(20, 1024), (5, 7), (200, 16)])  # k > bank size: all rows vote
def test_knn_scores_match_brute_force(k, chunk):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(150, 24, generator=g), torch.randn(37, 24, generator=g)
    bank_labels = torch.randint(0, 6, (150,), generator=g)
    got = knn_scores(bank, bank_labels, queries, 6, k=k, temperature=0.07, chunk=chunk)
    ref = brute_force_scores(bank, bank_labels, queries, 6, k, 0.07)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=0)
    query_labels = torch.randint(0, 6, (37,), generator=g)
    expected = (ref.argmax(1) == query_labels).double().mean().item()
    assert knn_top1(bank, bank_labels, queries, query_labels, 6, k=k) == pytest.approx(expected, abs=1e-12)


def test_knn_hand_worked_example():
    # bank on the unit circle at 0, 90 and 180 degrees; the query at 30 degrees: cosines 0.866, 0.5, -0.866
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    scores = knn_scores(bank, torch.tensor([0, 1, 1]), query, 2, k=2, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(0.866025 / 0.5), math.exp(0.5 / 0.5)]]), rtol=1e-5,
                               atol=0)
    # with all three voting and a high temperature, the two class-1 rows outvote the nearest class-0 row
    assert knn_top1(bank, torch.tensor([0, 1, 1]), query, torch.tensor([1]), 2, k=3, temperature=10.0) == 1.0


def test_subset_takes_the_first_samples_of_every_shard_in_proportion():
    from data.info import DatasetInfo

    info = DatasetInfo(urls=["a", "b", "c"], num_samples=100, shard_sizes=[50, 30, 20])
    part = subset(info, 11)
    assert part.num_samples == 11 and sum(part.shard_sizes) == 11 and part.urls == ["a", "b", "c"]
    assert all(n <= full for n, full in zip(part.shard_sizes, [50, 30, 20])) and part.shard_sizes[0] >= 5
    assert subset(info, 1).urls == ["a"] and subset(info, 1).shard_sizes == [1]
    assert subset(info, 100) is info and subset(info, None) is info


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("knn") / "data")  # train 30 (3 shards), test 13 (5/5/3)


def knn_args(run_dir, data, *extra, steps=4):
    return [*TINY_MODEL, f"data.train={data}", "data.micro_batch=8", "data.num_workers=0",
            f"run.output_dir={run_dir}", f"run.steps={steps}", "run.log_every=1", "run.save_every=0",
            "run.trackers=none", "run.progress=false", "run.precision=no", "optim.warmup_steps=1", "vis.num_images=0",
            "data.eval_batch=4", *extra]


def recompute_top1(run_dir, data, bank_size=None, query_size=None) -> float:
    """knn_top1 of the exported encoder, from scratch: one process, its own extraction, the float64 reference."""
    from safetensors.torch import load_file

    from data.device_input import device_batches
    from data.eval_stream import build_eval_loader
    from data.info import resolve
    from data.transforms import eval_transform
    from models.vit import create_encoder

    encoder = create_encoder(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    encoder.load_state_dict(load_file(run_dir / "encoder.safetensors"))
    stats = json.loads((data / "dataset.json").read_text())["splits"]["train"]  # the run's default normalisation
    mean, std = stats["mean"], stats["std"]
    out = []
    for split, n in (("train", bank_size), ("test", query_size)):
        loader = build_eval_loader(subset(resolve(f"{data}:{split}"), n), batch_size=5,
                                   transform=eval_transform(32, mean, std))
        feats, labels = [], []
        with torch.no_grad():
            for batch in device_batches(loader, "cpu", mean=mean, std=std):
                feats.append(encoder.forward_features(batch["image"])[:, 0][batch["valid"]])
                labels.append(batch["label"][batch["valid"]])
        out += [torch.cat(feats), torch.cat(labels)]
    bank, bank_y, query, query_y = out
    scores = brute_force_scores(bank, bank_y, query, 3, 20, 0.07)
    return (scores.argmax(1) == query_y).double().mean().item()


def test_monitor_logs_knn_top1_in_the_step_record(tiny_data, tmp_path, capsys):
    from pretrain import mae

    mae.main(knn_args(tmp_path, tiny_data, "run.eval_every=3", "knn.bank_size=20", "knn.query_size=10"))
    assert "knn: bank 20 images" in capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # the baselines at step 0, then one record per step
    assert set(records[0]) == {"step", "knn_top1_init", "knn_top1_pixels"}
    records = records[1:]
    assert [r["step"] for r in records if "knn_top1" in r] == [3, 4]  # every 3 steps and at the end: knn_top1 joins
    assert all("loss" in r for r in records)  # the loss record
    assert records[-1]["knn_top1"] == pytest.approx(recompute_top1(tmp_path, tiny_data, 20, 10), abs=1e-12)


@pytest.mark.slow
def test_monitor_on_two_ranks_counts_every_image_once(tiny_data, tmp_path):
    args = knn_args(tmp_path, tiny_data, "run.eval_every=0", steps=2)
    launch_two(f"from pretrain.mae import main\nmain({args!r})\n", tmp_path)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert record["step"] == 2
    # the whole splits (30 bank, 13 queries over uneven shards) split over two ranks and gathered: as one process
    assert record["knn_top1"] == pytest.approx(recompute_top1(tmp_path, tiny_data), abs=1e-12)


def test_monitor_is_off_without_labels(tiny_data, tmp_path, capsys):
    from pretrain import mae

    mae.main([*knn_args(tmp_path, f"{tiny_data}:nolabels", steps=1), "data.micro_batch=4"])
    out = capsys.readouterr().out
    assert "knn: off (bank split" in out and "has no labels" in out
    assert not any("knn_top1" in r for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_a_named_split_that_does_not_exist_is_one_line(tiny_data, tmp_path, capsys):
    from launch.errors import cli
    from pretrain import mae

    with pytest.raises(SystemExit) as exit_info:
        cli("pretrain/mae.py", mae.main)(knn_args(tmp_path, tiny_data, f"knn.query={tiny_data}:val", steps=1))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain/mae.py: error: knn.query:") and "no split 'val'" in err and "\n" not in err


def test_knn_config_in_help_and_checked():
    from launch.config import ConfigError, load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, [])
    assert cfg.knn.enabled and cfg.knn.k == 20 and cfg.knn.temperature == 0.07  # on for the default run
    with pytest.raises(ConfigError, match="knn"):
        load_config(PretrainConfig, ["knn.k=0"])
