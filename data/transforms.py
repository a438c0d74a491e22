"""Image transforms for MAE pretraining, fine-tuning and evaluation.

Input: what `data.decode.decode_image` gives (an unloaded RGB JPEG or any PIL image). Output, by `output=`:
- "uint8": a uint8 [C, H, W] tensor, not normalised; the training device converts and normalises whole batches
  (`data.device_input.device_batches`), so workers hand over 4x fewer bytes and skip ToTensor + Normalize.
- "float": a normalised float32 [C, H, W] tensor, through the PIL/timm path as before (default, for callers that
  feed the model directly: visualize, evaluate, tests).

- `pretrain_transform`: the MAE recipe, RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip. uint8:
  `data.resized_crop.RandomResizedCropFlip` (crop-aware reduced JPEG decode, libjpeg-turbo, antialiased bicubic on
  uint8 tensors; same crop and flip draws as the float path).
- `finetune_transform`: timm's `create_transform(is_training=True, ...)` with RandAugment and random erasing (the
  MAE/DeiT fine-tuning recipe). uint8: timm's own prefetcher form (`use_prefetcher=True`: PIL crop, flip and
  RandAugment, then `MaybePILToTensor`); random erasing then runs on the device on the normalised batch, as in
  timm's PrefetchLoader (`data.device_erasing.DeviceRandomErasing`). Mixup/cutmix act on whole batches and live
  with the training loop.
- `eval_transform`: resize the shorter side to img_size / crop_pct, center crop (timm's eval transform). uint8:
  `data.resized_crop.ResizeCenterCrop`.
PIL paths start with `data.decode.LoadPixels(len(mean))` (which loads the image, so an undecodable one raises
`CorruptSample`, counted and skipped by the loaders, rather than PIL's OSError): the channel count follows mean/std,
and 16-bit, float and `.npy` pixels continue as float tensors in [0, 1] through the same crops and flips.
The loaders seed Python's, NumPy's and torch's global RNGs per sample
before calling a transform, so these transforms are reproducible without holding generators of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as T

from data.decode import LoadPixels
from data.pillow_compat import install as install_posterize_fix
from data.resized_crop import RandomResizedCropFlip, ResizeCenterCrop

# CIFAR-10 training set, per-channel mean and (population) std of pixel values in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)

# crop_pct used when none is given: no crop for tiny images (CIFAR), the usual 0.875 (224/256) otherwise.
SMALL_IMAGE = 64
OUTPUTS = ("float", "uint8")


def default_crop_pct(img_size: int) -> float:
    return 1.0 if img_size <= SMALL_IMAGE else 0.875


def uint8_output(meta: dict | None, channels: int) -> str:
    """"uint8" when the images are 8-bit RGB (dataset.json `dtype` uint8 or not recorded), the fast path that
    normalises on the device; "float" for other channel counts and bit depths, which the uint8 crop cannot hold."""
    dtype = (meta or {}).get("dtype")
    return "uint8" if channels == 3 and dtype in (None, "uint8") else "float"


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def pretrain_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, output: str = "float"):
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip; uint8 or normalised float
    (mean/std are used by the float output only: for uint8 the device normalises)."""
    _check_output(output)
    if output == "uint8":
        return RandomResizedCropFlip(img_size, scale=scale, hflip=hflip, interpolation="bicubic")
    return T.Compose([
        LoadPixels(len(mean)),
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(hflip),
        MaybeToTensor(),  # ToTensor for PIL images; tensors are already float in [0, 1]
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       remode: str = "pixel", recount: int = 1, color_jitter: float | None = None,
                       scale: tuple[float, float] | None = None, interpolation: str = "bicubic", hflip: float = 0.5,
                       output: str = "float"):
    """Fine-tuning augmentation through timm: RandomResizedCrop + flip + RandAugment + normalise + RandomErasing.

    output="uint8": timm's prefetcher form, without normalisation and random erasing (reprob/remode/recount are
    then for `data.device_erasing.DeviceRandomErasing`, applied to the normalised batch on the device)."""
    _check_output(output)
    install_posterize_fix()  # timm RandAugment vs Pillow >= 13 (see data/pillow_compat.py)
    timm_tf = create_transform(
        img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, re_mode=remode, re_count=recount,
        color_jitter=color_jitter, scale=scale, interpolation=interpolation, hflip=hflip,
        mean=tuple(mean), std=tuple(std), use_prefetcher=output == "uint8",
    )
    return T.Compose([LoadPixels(len(mean)), *timm_tf.transforms])


def eval_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   crop_pct: float | None = None, interpolation: str = "bicubic", output: str = "float"):
    """Evaluation: resize shorter side to floor(img_size / crop_pct), center crop img_size; uint8, or to tensor and
    normalise (float)."""
    _check_output(output)
    crop_pct = default_crop_pct(img_size) if crop_pct is None else crop_pct
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if output == "uint8":
        return ResizeCenterCrop(img_size, crop_pct, interpolation)
    timm_tf = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                               mean=tuple(mean), std=tuple(std))
    return T.Compose([LoadPixels(len(mean)), *timm_tf.transforms])
