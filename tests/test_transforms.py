"""Transforms and decoding: normalisation against float64 numpy, crops, seeded reproducibility, constants, draft."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import CorruptSample, decode_image, decode_label
from data.seeding import mix_seed, seeded_global_rngs
from data.transforms import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, eval_transform,
                             finetune_transform, pretrain_transform)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _random_image(h, w, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalised_f64(img: Image.Image, mean, std) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64) / 255.0  # [H, W, C]
    return ((a - np.array(mean)) / np.array(std)).transpose(2, 0, 1)  # [C, H, W]


def test_eval_32px_is_identity_crop_and_exact_normalisation():
    img = _random_image(32, 32)
    out = eval_transform(32, CIFAR10_MEAN, CIFAR10_STD)(img)  # crop_pct defaults to 1.0 at 32 px
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _normalised_f64(img, CIFAR10_MEAN, CIFAR10_STD), atol=1e-5)


def test_eval_crop_pct_resizes_then_center_crops():
    img = _random_image(256, 320, seed=1)  # shorter side 256 = 224 / 0.875: no resize, crop the center
    out = eval_transform(224, crop_pct=0.875)(img)
    ref = _normalised_f64(img.crop((48, 16, 48 + 224, 16 + 224)), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(224, crop_pct=1.5)


def test_pretrain_transform_crops_flips_and_normalises():
    img = Image.new("RGB", (50, 40), (200, 100, 30))  # constant colour: every crop gives the same pixels
    out = pretrain_transform(16, CIFAR10_MEAN, CIFAR10_STD)(img)
    ref = (np.array([200, 100, 30]) / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(ref[:, None, None], (3, 16, 16)), atol=1e-4)
    t = pretrain_transform(16)
    rrc = t.transforms[0]
    assert rrc.scale == (0.2, 1.0) and rrc.interpolation.value == "bicubic"


def test_augmentation_is_a_function_of_the_seed():
    img = _random_image(48, 48, seed=2)
    for t in (pretrain_transform(32), finetune_transform(32)):
        outs = []
        for seed in (mix_seed(0, "aug", 5), mix_seed(0, "aug", 5), mix_seed(0, "aug", 6)):
            with seeded_global_rngs(seed):
                outs.append(t(img))
        assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_seeded_rngs_restore_the_callers_streams():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded_global_rngs(7):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_finetune_transform_is_timms_recipe():
    t = finetune_transform(32, CIFAR10_MEAN, CIFAR10_STD)
    names = [type(s).__name__ for s in t.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and "RandomErasing" in names
    erasing = t.transforms[names.index("RandomErasing")]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert finetune_transform(32)(_random_image(40, 40)).shape == (3, 32, 32)
    assert "RandAugment" not in [type(s).__name__ for s in finetune_transform(32, auto_augment=None).transforms]


def test_constants_match_timm_and_the_cifar_sample():
    import timm.data

    assert IMAGENET_MEAN == tuple(timm.data.IMAGENET_DEFAULT_MEAN)
    assert IMAGENET_STD == tuple(timm.data.IMAGENET_DEFAULT_STD)
    pixels = []
    with tarfile.open(SAMPLE / "train-000000.tar.gz") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg"):
                pixels.append(np.asarray(Image.open(tar.extractfile(m)).convert("RGB"), dtype=np.float64) / 255)
    pixels = np.stack(pixels).reshape(-1, 3)  # [N*H*W, C]
    np.testing.assert_allclose(pixels.mean(0), CIFAR10_MEAN, atol=0.02)
    np.testing.assert_allclose(pixels.std(0), CIFAR10_STD, atol=0.02)


def test_decode_draft_and_labels():
    buf = io.BytesIO()
    _random_image(256, 200).save(buf, format="JPEG")
    sample = {"__key__": "k", "jpg": buf.getvalue(), "cls": b"7"}
    assert decode_image(sample).size == (200, 256)
    assert decode_image(sample, draft_size=64).size == (100, 128)  # 1/2 scale: 1/4 would give 50 < 64
    assert decode_image(sample, draft_size=40).size == (50, 64)
    assert decode_label(sample) == 7 and decode_label({"jpg": b""}) == -1
    png = io.BytesIO()
    _random_image(30, 20).save(png, format="PNG")
    assert decode_image({"png": png.getvalue()}, draft_size=8).size == (20, 30)  # draft is JPEG-only
    with pytest.raises(CorruptSample):
        decode_image({"__key__": "bad", "jpg": buf.getvalue()[:200]})
    with pytest.raises(CorruptSample, match="no image"):
        decode_image({"__key__": "x", "txt": b"hello"})
