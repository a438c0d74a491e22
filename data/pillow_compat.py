"""Shim: timm's RandAugment `rand-...-inc1` posterize asks Pillow for 0 bits, which Pillow >= 13 refuses.

timm 1.0.31 maps the increasing-posterize magnitude 10 (reachable with `mstd0.5`) to `bits_to_keep = 0` and calls
`ImageOps.posterize(img, 0)`; Pillow 13 raises `ValueError: bits must be between or equal to 1 and 8` (older Pillow
returned an all-black image). `install()` points timm's posterize ops at a version that returns that black image for
0 bits, so the MAE fine-tuning recipe runs. It must run before the transform is built (ops capture their function).
`data.transforms.finetune_transform` installs it before building timm's transform; remove it once timm handles this.
"""

from __future__ import annotations

from PIL import Image, ImageOps


def posterize_keep_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # keep no bits: every pixel 0, as Pillow < 13 did
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def install() -> None:
    from timm.data import auto_augment

    original = auto_augment.posterize
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize_keep_bits


__all__ = ["install", "posterize_keep_bits"]
