"""Evaluation stream: each image exactly once over 1-3 ranks x workers with uneven shards; equal batch counts."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.eval_stream import build_eval_loader, split_range
from data.transforms import eval_transform

SIZES = [7, 3, 11, 5, 9]  # 35 samples, uneven shards
TRANSFORM = eval_transform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _image(g: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(g).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def _png(g: int) -> bytes:  # lossless, so the expected tensor can be computed from the source image
    buf = io.BytesIO()
    _image(g).save(buf, "PNG")
    return buf.getvalue()


def _write(folder: Path, sizes, corrupt=(), with_json=True):
    folder.mkdir(parents=True, exist_ok=True)
    g, shards = 0, []
    for k, n in enumerate(sizes):
        name = f"val-{k:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as tw:
            for _ in range(n):
                tw.write({"__key__": f"k{g:05d}", "png": b"garbage" if g in corrupt else _png(g),
                          "cls": str(g % 4).encode()})
                g += 1
        shards.append({"name": name, "num_samples": n})
    if with_json:
        meta = {"splits": {"val": {"num_samples": g, "num_shards": len(sizes), "num_classes": 4,
                                   "class_names": list("abcd"), "shards": shards}}}
        (folder / "dataset.json").write_text(json.dumps(meta))
    return g


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val_shards")
    _write(folder, SIZES)
    return folder


def _run(spec, world_size, num_workers, batch_size=4):
    per_rank = []
    for rank in range(world_size):
        loader = build_eval_loader(spec, batch_size=batch_size, transform=TRANSFORM, rank=rank,
                                   world_size=world_size, num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 0), (1, 2), (2, 2), (3, 2)])
def test_every_image_exactly_once(val_dir, world_size, num_workers):
    per_rank = _run(f"{val_dir}:val", world_size, num_workers)
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    seen = []
    for batches in per_rank:
        for b in batches:
            v = b["valid"]
            assert b["image"].shape == (4, 3, 8, 8) and (b["index"][~v] == -1).all()
            assert torch.equal(b["label"][v], b["index"][v] % 4)
            seen += b["index"][v].tolist()
    assert sorted(seen) == list(range(35))


def test_images_are_the_transformed_sources(val_dir):
    (batches,) = _run(f"{val_dir}:val", 1, 0, batch_size=8)
    for b in batches[:2]:
        for g, img in zip(b["index"].tolist(), b["image"]):
            assert torch.equal(img, TRANSFORM(_image(g)))


def test_split_range_covers_without_overlap():
    parts = [split_range(3, 20, 4, i) for i in range(4)]
    assert parts[0][0] == 3 and parts[-1][1] == 20 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert {b - a for a, b in parts} <= {4, 5}


def test_corrupt_and_truncated_become_invalid_placeholders(tmp_path):
    _write(tmp_path, SIZES, corrupt={4, 20})
    shard = tmp_path / "val-000003.tar"  # holds samples 21..25; keep roughly its first two
    shard.write_bytes(shard.read_bytes()[:4000])
    per_rank = _run(f"{tmp_path}:val", 2, 0)
    seen, n_corrupt = [], 0
    for batches in per_rank:
        n_corrupt += batches[-1]["n_corrupt"]
        for b in batches:
            seen += b["index"][b["valid"]].tolist()
    lost = set(range(35)) - set(seen)
    assert {4, 20} <= lost and lost - {4, 20} <= set(range(21, 26)) and len(lost) >= 4
    assert n_corrupt >= len(lost)
    assert [len(b) for b in per_rank] == [5, 5]  # as without damage: ranks hold 17 and 18 samples, batch 4


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_each_lost_sample_is_counted_exactly_once(tmp_path, world_size, num_workers):
    """Issue 12 item 10: a truncated shard's lost samples counted once (not once more for the read error), in the
    running total and in the per-entry `corrupt` mask; valid + corrupt entries = the split's recorded size."""
    import tarfile

    _write(tmp_path, SIZES, corrupt={4, 20})
    shard = tmp_path / "val-000003.tar"  # samples 21..25; cut in the middle of the second one's image data, where
    with tarfile.open(shard) as tf:     # the tar reader raises an error (a cut between members ends it quietly)
        png = [m for m in tf.getmembers() if m.name.endswith(".png")][1]
    shard.write_bytes(shard.read_bytes()[: png.offset_data + png.size // 2])
    per_rank = _run(f"{tmp_path}:val", world_size, num_workers)
    seen, corrupt, running = [], [], 0
    for batches in per_rank:
        running += batches[-1]["n_corrupt"]
        for b in batches:
            assert not (b["corrupt"] & b["valid"]).any() and (b["index"][b["corrupt"]] >= 0).all()  # never padding
            seen += b["index"][b["valid"]].tolist()
            corrupt += b["index"][b["corrupt"]].tolist()
    lost = set(range(35)) - set(seen)
    assert sorted(corrupt) == sorted(lost) and len(lost) >= 4
    assert running == len(lost)


def test_pattern_without_dataset_json_counts_shards(tmp_path):
    _write(tmp_path, [4, 6], with_json=False)
    loader = build_eval_loader(str(tmp_path / "val-{000000..000001}.tar"), batch_size=3, transform=TRANSFORM)
    assert loader.num_samples == 10 and len(loader) == 4
    assert sorted(i for b in loader for i in b["index"][b["valid"]].tolist()) == list(range(10))


def _logging_pipe(tmp_path, folder):
    """A `pipe:` spec over the shards of `folder` whose command logs each shard it is asked for."""
    log = tmp_path / "opened.log"
    script = tmp_path / "open_shard.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec cat {folder}/val-"$1".tar\n')
    script.chmod(0o755)
    return f"pipe:{script} {{000000..000004}}", log


@pytest.mark.parametrize("n,shards_read", [(4, ["000000"]), (9, ["000000", "000001"])])
def test_first_images_read_only_the_shards_they_need(tmp_path, n, shards_read):
    """Issue 12 item 9: remote data without dataset.json; the grid's images come from the first shard(s) only."""
    from data.first_images import first_images

    folder = tmp_path / "shards"
    _write(folder, SIZES, corrupt={1}, with_json=False)
    spec, log = _logging_pipe(tmp_path, folder)
    images = first_images(spec, n, TRANSFORM)
    assert log.read_text().split() == shards_read
    wanted = [g for g in range(35) if g != 1][:n]  # sample 1 is corrupt: skipped
    assert images.shape == (n, 3, 8, 8)
    assert all(torch.equal(img, TRANSFORM(_image(g))) for img, g in zip(images, wanted))


def test_first_images_gives_what_there_is(tmp_path):
    from data.first_images import first_images

    _write(tmp_path, [2, 1])
    assert first_images(f"{tmp_path}:val", 8, TRANSFORM).shape == (3, 3, 8, 8)
    assert first_images(f"{tmp_path}:val", 0, TRANSFORM) is None
