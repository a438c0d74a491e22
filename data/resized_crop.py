"""uint8 crops for the workers: RandomResizedCrop + flip (training) and resize + center crop (evaluation).

Both take what `data.decode.decode_image` returns (an unloaded RGB JPEG, or any PIL image) or a uint8 [C, H, W]
tensor, and return a contiguous uint8 [C, size, size] tensor. The geometry is decided first, from the header's
image size, so a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that still leaves the crop at least
the output size (`data.decode.dct_reduction`); at full scale it is decoded by libjpeg-turbo through
`torchvision.io.decode_jpeg`. Resizing is torchvision's `transforms.v2` resized_crop on uint8 tensors, antialiased,
bicubic by default: torch's native uint8 CPU kernel (no float round trip), whose antialiased bicubic is the same
filter as PIL's, so crops match the PIL path within rounding (tests/test_transforms.py).

Randomness: the crop box is drawn by torchvision's own `RandomResizedCrop.get_params` and the flip by
`torch.rand(1) < p`, as `transforms.RandomResizedCrop` + `RandomHorizontalFlip` do, from torch's global CPU
generator that the loaders seed per sample: the same seed gives the same box and flip as the PIL path, and resume
stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _TorchvisionRRC
from torchvision.transforms.v2 import functional as F

from data.decode import dct_reduction, is_unloaded_jpeg, uint8_pixels

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _size_hw(img) -> tuple[int, int]:
    return (int(img.shape[-2]), int(img.shape[-1])) if isinstance(img, torch.Tensor) else (img.height, img.width)


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def _scale_box(box: tuple[int, int, int, int], scale: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in full-size pixels -> the same box in an image decoded at `scale`."""
    if scale == 1.0:
        return box
    top, left, h, w = box
    h2, w2 = max(1, round(h * scale)), max(1, round(w * scale))
    top2 = min(round(top * scale), hw[0] - h2)
    left2 = min(round(left * scale), hw[1] - w2)
    return top2, left2, h2, w2


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) then horizontal flip with probability `hflip`, to uint8 [C, size, size].

    `size`: int or (h, w). Draws exactly what torchvision's RandomResizedCrop + RandomHorizontalFlip draw."""

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "bicubic"):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.interpolation = _interpolation(interpolation)

    def __call__(self, img) -> torch.Tensor:
        box = _TorchvisionRRC.get_params(img, list(self.scale), list(self.ratio))  # (top, left, h, w)
        flip = bool(torch.rand(1) < self.hflip)
        reduce = dct_reduction(_size_hw(img), box[2:], self.size) if is_unloaded_jpeg(img) else 1
        pixels, scale = uint8_pixels(img, reduce)
        top, left, h, w = _scale_box(box, scale, _size_hw(pixels))
        out = F.resized_crop(pixels, top, left, h, w, list(self.size), interpolation=self.interpolation,
                             antialias=True)
        if flip:
            out = F.horizontal_flip(out)
        return out.contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, interpolation={self.interpolation.value})")


class ResizeCenterCrop:
    """timm's evaluation geometry on uint8: resize the shorter side to floor(size / crop_pct), center crop `size`."""

    def __init__(self, size: int, crop_pct: float, interpolation: str = "bicubic"):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = size
        self.scale_size = math.floor(size / crop_pct)
        self.interpolation = _interpolation(interpolation)

    def __call__(self, img) -> torch.Tensor:
        hw = _size_hw(img)
        reduce = dct_reduction(hw, hw, (self.scale_size, self.scale_size)) if is_unloaded_jpeg(img) else 1
        pixels, _ = uint8_pixels(img, reduce)
        out = F.resize(pixels, self.scale_size, interpolation=self.interpolation, antialias=True)
        return F.center_crop(out, [self.size, self.size]).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale_size={self.scale_size})"


__all__ = ["INTERPOLATIONS", "RandomResizedCropFlip", "ResizeCenterCrop"]
