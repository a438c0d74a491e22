"""Image transforms for MAE pretraining, fine-tuning and evaluation (PIL image in, normalised float tensor out).

- `pretrain_transform`: the MAE recipe, RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + normalise.
- `finetune_transform`: timm's `create_transform(is_training=True, ...)` with RandAugment and random erasing
  (the MAE/DeiT fine-tuning recipe). Mixup/cutmix act on whole batches and live with the training loop.
- `eval_transform`: resize the shorter side to img_size / crop_pct, center crop, normalise (timm's eval transform).
The loaders seed Python's, NumPy's and torch's global RNGs per sample before calling a transform, so these
transforms are reproducible without holding generators of their own.
"""

from __future__ import annotations

from typing import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from data.pillow_compat import install as install_posterize_fix
from torchvision import transforms as T

# CIFAR-10 training set, per-channel mean and (population) std of pixel values in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)

# crop_pct used when none is given: no crop for tiny images (CIFAR), the usual 0.875 (224/256) otherwise.
SMALL_IMAGE = 64


def default_crop_pct(img_size: int) -> float:
    return 1.0 if img_size <= SMALL_IMAGE else 0.875


def pretrain_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5) -> T.Compose:
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip, to tensor, normalise."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       remode: str = "pixel", recount: int = 1, color_jitter: float | None = None,
                       scale: tuple[float, float] | None = None, interpolation: str = "bicubic", hflip: float = 0.5):
    """Fine-tuning augmentation through timm: RandomResizedCrop + flip + RandAugment + normalise + RandomErasing."""
    install_posterize_fix()  # timm RandAugment vs Pillow >= 13 (see data/pillow_compat.py)
    return create_transform(
        img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, re_mode=remode, re_count=recount,
        color_jitter=color_jitter, scale=scale, interpolation=interpolation, hflip=hflip,
        mean=tuple(mean), std=tuple(std),
    )


def eval_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   crop_pct: float | None = None, interpolation: str = "bicubic"):
    """Evaluation: resize shorter side to int(img_size / crop_pct), center crop img_size, to tensor, normalise."""
    crop_pct = default_crop_pct(img_size) if crop_pct is None else crop_pct
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std))
