"""The device-resident loader's size check comes before decoding (issue 26 item 5): a split whose dataset.json claims
more images than fit the limit is refused in one line naming the split, the estimate, the limit and
`data.loader=stream`, after decoding at most one image (none when dataset.json records the image size); without a
count, decoding stops once the images so far pass the limit. The pretraining command refuses it as a one-line error."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers_launch import ENTRY, PYTHON, ROOT, SAMPLE, TINY_MODEL, env

import data.device_dataset as device_dataset
from data.device_dataset import build_device_loader
from data.info import DatasetError

CLAIMED = 400_000_000  # 400 M CIFAR images: 1.1 TiB as uint8


def _fake_split(folder, *, image_size=None, count=CLAIMED):
    """The sample's test shards under a dataset.json that claims `count` images (no real data that big)."""
    folder.mkdir()
    meta = json.loads((ROOT / "data" / "sample" / "dataset.json").read_text())
    entry = meta["splits"]["test"]
    for shard in entry["shards"]:
        shutil.copy(ROOT / "data" / "sample" / shard["name"], folder / shard["name"])
        shard["num_samples"] = count // len(entry["shards"])
    entry["num_samples"] = count
    if image_size:
        entry["image_size"] = image_size
    (folder / "dataset.json").write_text(json.dumps({"format": meta["format"], "splits": {"train": entry}}))
    return folder


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images the device loader decodes."""
    seen = []
    real = device_dataset.uint8_pixels

    def counting(img, *args, **kwargs):
        seen.append(1)
        return real(img, *args, **kwargs)

    monkeypatch.setattr(device_dataset, "uint8_pixels", counting)
    return seen


@pytest.mark.parametrize("image_size, most_decoded", [(None, 1), ([32, 32], 0)])
def test_a_split_over_the_limit_is_refused_before_decoding(tmp_path, decodes, image_size, most_decoded):
    split = _fake_split(tmp_path / "big", image_size=image_size)
    with pytest.raises(DatasetError) as err:
        build_device_loader(str(split), batch_size=8, img_size=32, device="cpu")
    message = str(err.value)
    assert "\n" not in message and str(split) in message and "split train" in message
    assert "400,000,000 images of 3x32x32" in message and "1144.4 GiB" in message  # 4e8 * 3072 / 2**30
    assert "4 GiB limit" in message and "data.loader=stream" in message
    assert len(decodes) <= most_decoded


def test_without_a_count_decoding_stops_at_the_limit(tmp_path, decodes):
    """A bare shard path (no dataset.json beside it, so no count): refused once the decoded images pass the limit
    (35 images of 3 KiB pass 0.1 MiB), not after the whole 500-image shard."""
    shard = str(shutil.copy(f"{SAMPLE}/test-000000.tar.gz", tmp_path))
    with pytest.raises(DatasetError, match=r"more than 34 images of 3x32x32 .* 0\.0001 GiB limit"):
        build_device_loader([shard], batch_size=8, img_size=32, device="cpu", max_gb=1e-4)
    assert len(decodes) <= 36  # the first image (its shape), then 35


def test_a_split_under_the_limit_still_loads(tmp_path):
    split = _fake_split(tmp_path / "ok", count=1000, image_size=[32, 32])
    loader = build_device_loader(str(split), batch_size=8, img_size=32, device="cpu")
    assert tuple(loader.images.shape) == (1000, 3, 32, 32) and loader.n_corrupt == 0


def test_pretraining_refuses_it_in_one_line(tmp_path):
    """`python pretrain/mae.py data.loader=device data.train=<that split>` (+ sizes): exit 2, one line."""
    split = _fake_split(tmp_path / "big")
    cmd = [PYTHON, ENTRY, "data.loader=device", f"data.train={split}", *TINY_MODEL, "data.micro_batch=8",
           f"run.output_dir={tmp_path / 'run'}", "run.steps=2", "run.trackers=none", "run.progress=false",
           "knn.enabled=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pretrain/mae.py: error: ") and "Traceback" not in proc.stderr
    assert "1144.4 GiB" in errors[0] and "data.loader=stream" in errors[0]
