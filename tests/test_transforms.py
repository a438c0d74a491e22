"""Transforms and decoding: normalisation against float64 numpy, crops, seeded reproducibility, constants, draft;
the uint8 path against the PIL path (same crop and flip draws, pixels within rounding), crop-aware reduced decode."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import CorruptSample, dct_reduction, decode_image, decode_label, is_unloaded_jpeg, load_image
from data.seeding import mix_seed, seeded_global_rngs
from data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)

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
    rrc = t.transforms[1]  # after load_image
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
    assert names[1] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and "RandomErasing" in names
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
        decode_image({"__key__": "bad", "jpg": buf.getvalue()[:200]})  # not even a header
    truncated = {"__key__": "bad", "jpg": buf.getvalue()[:len(buf.getvalue()) // 2]}
    with pytest.raises(CorruptSample):
        decode_image(truncated, draft_size=64)
    lazy = decode_image(truncated)  # header only: the body is decoded (and found corrupt) by the transform
    for tf in (pretrain_transform(32), pretrain_transform(32, output="uint8"), eval_transform(32, output="uint8"),
               finetune_transform(32, output="uint8")):
        with pytest.raises(CorruptSample):
            tf(decode_image(truncated))
    with pytest.raises(CorruptSample):
        load_image(lazy)
    with pytest.raises(CorruptSample, match="no image"):
        decode_image({"__key__": "x", "txt": b"hello"})


def _jpeg(h, w, seed=0, smooth=False) -> bytes:
    """A JPEG with photo-like detail (random pixels upscaled 8x, plus fine noise), or smooth gradients."""
    rng = np.random.default_rng(seed)
    if smooth:
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([128 + 90 * np.sin(xx / 41.0), 128 + 90 * np.cos(yy / 29.0),
                      128 + 60 * np.sin((xx + yy) / 53.0)], -1)
    else:
        coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
        a = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
        a = a + rng.normal(0, 12, a.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("hw,size", [((300, 400), 224), ((40, 56), 32), ((32, 32), 32)])
def test_uint8_pretrain_path_matches_pil_path(hw, size):
    """Same seed: same crop box and flip as the PIL float path; pixels equal within resampling rounding."""
    data = _jpeg(*hw)
    mean, std = (0.5, 0.5, 0.5), (1 / 255, 1 / 255, 1 / 255)  # float path in pixel units, centred
    old, new = pretrain_transform(size, mean, std), pretrain_transform(size, output="uint8")
    diffs = []
    for seed in range(8):
        with seeded_global_rngs(seed):
            a = old(decode_image({"jpg": data})) + 127.5
        with seeded_global_rngs(seed):
            b = new(decode_image({"jpg": data}))
        assert b.dtype == torch.uint8 and b.shape == (3, size, size) and b.is_contiguous()
        diffs.append((a - b.float()).abs())
    d = torch.stack(diffs)
    assert d.mean() < 0.2 and d.max() <= 8  # a different crop or flip would differ by tens of levels


def test_uint8_eval_path_matches_timm_eval():
    data = _jpeg(300, 400, seed=3)
    mean, std = (0.5, 0.5, 0.5), (1 / 255, 1 / 255, 1 / 255)
    a = eval_transform(224, mean, std, crop_pct=0.875)(decode_image({"jpg": data})) + 127.5
    b = eval_transform(224, crop_pct=0.875, output="uint8")(decode_image({"jpg": data}))
    assert b.dtype == torch.uint8 and b.shape == (3, 224, 224)
    assert (a - b.float()).abs().mean() < 0.2 and (a - b.float()).abs().max() <= 4
    with pytest.raises(ValueError, match="output"):
        eval_transform(32, output="half")


def test_dct_reduction_rule():
    # region / (2 x out) >= s: the largest power of two s <= 8 (PIL's reducing_gap=2)
    assert dct_reduction((500, 375), (375, 375), (224, 224)) == 1
    assert dct_reduction((2000, 1600), (1000, 900), (224, 224)) == 2  # 900 / 448 = 2.0
    assert dct_reduction((4000, 4000), (4000, 4000), (224, 224)) == 8
    assert dct_reduction((64, 64), (64, 64), (8, 8)) == 4


def test_reduced_decode_is_used_and_equals_full_decode_of_its_box():
    """A crop that allows it is decoded at 1/2..1/8 scale; its box, rounded to the reduced grid, is the box a full
    decode would crop (so the reduced path is the full path up to that rounding and the DCT's averaging)."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    from data.resized_crop import _scale_box

    h, w, size = 1200, 1600, 64  # both sides divisible by 8: the reduced grid maps exactly onto source pixels
    data = _jpeg(h, w, smooth=True)
    t = pretrain_transform(size, output="uint8")
    full = load_image(decode_image({"jpg": data}))
    full_px = torch.from_numpy(np.array(full)).permute(2, 0, 1)
    reductions = []
    for seed in range(6):
        lazy = decode_image({"jpg": data})
        assert is_unloaded_jpeg(lazy)
        with seeded_global_rngs(seed):
            out = t(lazy)
        with seeded_global_rngs(seed):
            box = RandomResizedCrop.get_params(full, [0.2, 1.0], [3 / 4, 4 / 3])
            flip = bool(torch.rand(1) < 0.5)
        r = dct_reduction((h, w), box[2:], (size, size))
        reductions.append(r)
        top, left, bh, bw = (v * r for v in _scale_box(box, 1 / r, (h // r, w // r)))
        ref = F.resized_crop(full_px, top, left, bh, bw, [size, size], antialias=True,
                             interpolation=F.InterpolationMode.BICUBIC)
        ref = F.horizontal_flip(ref) if flip else ref
        assert (out.float() - ref.float()).abs().mean() < 1.0
    assert max(reductions) >= 4


def test_finetune_uint8_is_timms_prefetcher_form():
    t = finetune_transform(32, output="uint8")
    names = [type(s).__name__ for s in t.transforms]
    assert "RandAugment" in names and "RandomErasing" not in names and names[-1] == "MaybePILToTensor"
    with seeded_global_rngs(1):
        out = t(decode_image({"jpg": _jpeg(48, 48)}))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
