"""Token features for the attentive probe: exact-once extraction (1 and 2 processes, uneven shards, the gather in
small slices) equal to a direct forward; the memory plan's arithmetic against a hand computation; the safetensors
token cache (round trip, a stale key and a damaged file are misses, nothing pickled)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ENC, make_tiny_dataset
from helpers_launch import ROOT, launch_two
from safetensors.torch import load_file

from finetune.features import FeatureCache
from launch.cache_memory import token_cache_plan
from launch.features import extract_tokens, gather_rows


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tokens") / "data")  # train 30 (3 shards), test 13 (5/5/3)


def tiny_encoder():
    from models.vit import create_encoder

    torch.manual_seed(0)
    return create_encoder(**TINY_ENC).eval()


def direct_tokens(encoder, data, split):
    """Every image of the split through `forward_features` in one process, in the stream's order (no gather)."""
    from data.device_input import device_batches
    from data.eval_stream import build_eval_loader
    from data.transforms import eval_transform

    loader = build_eval_loader(f"{data}:{split}", batch_size=4, transform=eval_transform(32, (0.5,) * 3, (0.25,) * 3))
    tokens, labels = [], []
    with torch.no_grad():
        for batch in device_batches(loader, "cpu", mean=(0.5,) * 3, std=(0.25,) * 3):
            tokens.append(encoder.forward_features(batch["image"])[batch["valid"]])
            labels.append(batch["label"][batch["valid"]])
    return torch.cat(tokens), torch.cat(labels)


def stream(data, split, rank=0, world=1, batch_size=4):
    from data.device_input import device_batches
    from data.eval_stream import build_eval_loader
    from data.transforms import eval_transform

    loader = build_eval_loader(f"{data}:{split}", batch_size=batch_size, rank=rank, world_size=world,
                               transform=eval_transform(32, (0.5,) * 3, (0.25,) * 3))
    return device_batches(loader, "cpu", mean=(0.5,) * 3, std=(0.25,) * 3)


def test_one_process_tokens_are_the_forward_pass_in_fp16(tiny_data):
    encoder = tiny_encoder()
    ref, ref_y = direct_tokens(encoder, tiny_data, "test")  # [13, 1+16, 32]
    tokens, labels = extract_tokens(encoder, stream(tiny_data, "test"), None, progress=False)
    assert tokens.dtype == torch.float16 and tokens.shape == (13, 16, 32)  # patch tokens only: 4 x 4 patches of 8 px
    torch.testing.assert_close(tokens, ref[:, 1:].half())
    assert torch.equal(labels, ref_y)
    with_cls, _ = extract_tokens(encoder, stream(tiny_data, "test"), None, include_prefix=True, progress=False)
    torch.testing.assert_close(with_cls, ref.half())


def test_two_processes_extract_every_image_once_and_gather_in_slices(tiny_data, tmp_path):
    encoder_path = tmp_path / "encoder.pt"
    torch.save(tiny_encoder().state_dict(), encoder_path)
    script = f"""
import sys; sys.path.insert(0, {str(ROOT / "tests")!r})
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from launch.features import extract_tokens, gather_rows
from models.vit import create_encoder
from test_token_features import stream
acc = Accelerator()
enc = create_encoder(**{TINY_ENC!r}).eval()
enc.load_state_dict(torch.load({str(encoder_path)!r}, weights_only=True))
tokens, labels = extract_tokens(enc, stream({str(tiny_data)!r}, "test", acc.process_index, 2), acc, progress=False)
# uneven rows (3 and 5) through slices of 2 rows (max_bytes = 2 rows of 2 x 3 fp16 values): rank 1 runs past rank 0
rows = torch.arange(30, dtype=torch.float16).reshape(5, 2, 3)[: 3 + 2 * acc.process_index] + 100 * acc.process_index
sliced = gather_rows(rows, acc, max_bytes=2 * 2 * 3 * 2)
out = {str(tmp_path)!r} + f"/rank{{acc.process_index}}.st"
save_file({{"tokens": tokens, "labels": labels, "sliced": sliced}}, out)
"""
    launch_two(script, tmp_path)
    ref, ref_y = direct_tokens(tiny_encoder(), tiny_data, "test")
    rows = torch.arange(30, dtype=torch.float16).reshape(5, 2, 3)
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.st")
        # every image once (5/5/3 shards over two ranks), in stream order per rank: compare as sets of rows
        assert got["tokens"].shape == (13, 16, 32) and sorted(got["labels"].tolist()) == sorted(ref_y.tolist())
        order = torch.argsort(got["tokens"].float().sum((1, 2)))
        ref_order = torch.argsort(ref[:, 1:].half().float().sum((1, 2)))
        torch.testing.assert_close(got["tokens"][order], ref[:, 1:].half()[ref_order])
        assert torch.equal(got["sliced"], torch.cat([rows[:3], rows + 100]))


def test_gather_rows_is_the_identity_in_one_process():
    x = torch.randn(4, 2)
    assert gather_rows(x, None) is x


def test_memory_plan_arithmetic():
    # CIFAR-10 train at ViT-Tiny/4: 50,000 images x 64 patch tokens x 192 wide x 2 bytes (fp16), two processes
    need = 50_000 * 64 * 192 * 2 * 2
    assert need == 2_457_600_000
    plan = token_cache_plan(50_000, 64, 192, copies=2, available=4 * 2 ** 30, fraction=0.5)
    assert plan.bytes_needed == need and plan.budget == 2 * 2 ** 30 and not plan.fits  # 2.29 GiB > 2 GiB
    assert token_cache_plan(50_000, 64, 192, copies=2, available=4 * 2 ** 30, fraction=0.6).fits  # 2.4 GiB budget
    assert token_cache_plan(50_000, 64, 192, copies=1, available=4 * 2 ** 30, fraction=0.5).fits  # 1.14 GiB
    assert str(plan) == ("token cache 50000 x 64 x 192 x 2 B x 2 process(es) = 2.29 GiB exceeds 50% of 4.00 GiB "
                         "available")
    exact = token_cache_plan(10, 4, 8, copies=1, available=1280, fraction=0.5)  # 640 bytes against a 640-byte budget
    assert exact.bytes_needed == 640 and exact.fits
    assert not token_cache_plan(10, 4, 8, copies=1, available=1279, fraction=0.5).fits  # budget int(639.5) = 639


def test_memory_plan_reads_available_memory_and_checks_its_fraction(monkeypatch):
    import psutil

    class Memory:
        available = 12345

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    plan = token_cache_plan(1, 1, 1)
    assert (plan.available, plan.copies) == (12345, 3)
    with pytest.raises(ValueError, match="fraction"):
        token_cache_plan(1, 1, 1, fraction=0.0)


def test_token_cache_round_trip_and_misses(tmp_path):
    """The probe's feature cache holds tokens too (the attentive probe names them `<split>.tokens`)."""
    cache = FeatureCache(tmp_path)
    tokens = torch.randn(5, 3, 4).half()
    labels = torch.tensor([0, 2, 1, 1, 0])
    path = cache.save("train.tokens", json.dumps({"encoder": "abc"}), tokens, labels)
    assert path == tmp_path / "features" / "train.tokens.safetensors"
    got = cache.load("train.tokens", json.dumps({"encoder": "abc"}))
    assert got is not None and torch.equal(got[0], tokens) and torch.equal(got[1], labels)
    assert got[0].dtype == torch.float16
    assert set(load_file(path)) == {"features", "labels"}  # a plain safetensors file: tensors only, no pickle
    assert cache.load("train.tokens", json.dumps({"encoder": "other"})) is None  # stale key
    assert cache.load("test.tokens", "anything") is None  # missing
    path.write_bytes(path.read_bytes()[:40])  # damaged
    assert cache.load("train.tokens", json.dumps({"encoder": "abc"})) is None
