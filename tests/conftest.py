"""Shared pytest set-up and the tiny things every test module uses, defined once:

* the repository root on sys.path, one thread per process (CI has 2 cores);
* `TINY_MAE` / `tiny_mae()`: a 16 px, patch-4, 2-block MAE built in-process (unit tests of models);
* `TINY_MODEL`: the same kind of tiny MAE as command-line overrides of `pretrain/mae.py` (32 px, patch 8);
* `TINY_ENC` / `make_tiny_encoder()`: a tiny random encoder saved as our encoder.safetensors;
* `make_tiny_dataset()`: real CIFAR JPEGs from the shipped sample in uneven shards: train (30 images, 3 classes,
  3 shards), test (13 images, 5/5/3: uneven over 2 ranks) and `nolabels`;
* the `tiny` fixture: that dataset and encoder, built once per session, and a fresh folder per test (`tiny["base"]`);
* `DOWNSTREAM`: the size overrides of a quick downstream run (probe, fine-tuning) on that dataset.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

SAMPLE = ROOT / "data" / "sample"
TINY_MAE = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                decoder_depth=1, decoder_num_heads=2)
# A 2-block, 32 px, patch-8 MAE (16 patches, 4 kept) as overrides of pretrain/mae.py: a few ms per step on one core.
TINY_MODEL = [
    "model.name=mae_vit_tiny_patch4_dec128d2b",
    "model.overrides.patch_size=8",
    "model.overrides.embed_dim=32",
    "model.overrides.depth=2",
    "model.overrides.num_heads=2",
    "model.overrides.decoder_embed_dim=32",
    "model.overrides.decoder_depth=1",
    "model.overrides.decoder_num_heads=2",
]
TINY_ENC = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
CLASSES = ["airplane", "automobile", "bird"]
N_TRAIN, N_TEST = 30, 13  # test shards of 5/5/3 images: uneven over 2 ranks
DOWNSTREAM = ["run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8",
              "data.eval_batch=4", "run.log_every=2"]


def tiny_mae(seed: int = 0, **overrides):
    """The tiny MAE of `TINY_MAE` (with overrides), seeded."""
    from models.mae import MaskedAutoencoder

    torch.manual_seed(seed)
    return MaskedAutoencoder(**{**TINY_MAE, **overrides})


def _sample_items(split: str, per_class: int, offset: int = 0) -> list[tuple[str, int]]:
    """(file, label) for images of the first classes, taken from the shipped sample's shards (real CIFAR JPEGs)."""
    dest = Path(tempfile.mkdtemp(prefix=f"tessera-sample-{split}-"))
    by_class: dict[int, list[str]] = {label: [] for label in range(len(CLASSES))}
    for shard in sorted(SAMPLE.glob(f"{split}-*.tar.gz")):
        with tarfile.open(shard) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(samples):
            label = int(samples[key]["cls"])
            if label in by_class and len(by_class[label]) < offset + per_class:
                path = dest / f"{key}.jpg"
                path.write_bytes(samples[key]["jpg"])
                by_class[label].append(str(path))
    return [(f, label) for label in by_class for f in by_class[label][offset: offset + per_class]]


def make_tiny_dataset(out: Path) -> Path:
    """`out/dataset.json` with train (30 images, 3 shards), test (13 images, 5/5/3) and `nolabels` (unlabelled)."""
    from data.make_shards import write_shards

    train = _sample_items("train", N_TRAIN // 3)
    test = _sample_items("test", 5)[:N_TEST]
    write_shards(train, out, split="train", shard_size=10, shuffle=True, class_names=CLASSES, progress=False)
    write_shards(test, out, split="test", shard_size=5, shuffle=False, class_names=CLASSES, progress=False)
    write_shards([(p, -1) for p, _ in test[:6]], out, split="nolabels", shard_size=3, shuffle=False, progress=False)
    return out


def make_tiny_encoder(out: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random-weight encoder saved as our encoder.safetensors (encoder_cfg in the metadata)."""
    from models.convert import save_encoder
    from models.vit import create_encoder

    torch.manual_seed(seed)
    cfg = {**TINY_ENC, **overrides}
    enc = create_encoder(**cfg)
    return save_encoder(enc.state_dict(), out, encoder_cfg=cfg)


def load_classifier(path):
    """(model in eval mode, classifier.json) of a saved classifier or its run directory, as users' tools read it."""
    from launch.weights import classifier_model, read_weights

    w = read_weights(str(path), want="classifier")
    return classifier_model(w), w.meta


@pytest.fixture(scope="session")
def tiny_shared(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tiny")
    return {"data": make_tiny_dataset(base / "data"),
            "encoder": make_tiny_encoder(base / "enc" / "encoder.safetensors")}


@pytest.fixture
def tiny(tiny_shared, tmp_path) -> dict:
    """The session's tiny dataset and encoder (read-only) and this test's own folder."""
    return {**tiny_shared, "base": tmp_path}
