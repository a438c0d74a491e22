"""Turn one raw WebDataset sample (dict of bytes) into an image and an integer label, and images into uint8 pixels.

Decoding is done here rather than by `wds.decode("pil")` so the loaders can (a) decode a large JPEG directly at
1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling through PIL's `draft`: much less work when the network input is far
smaller than the stored image), and (b) tell a corrupt image apart from a pipeline error, to count and skip it.

`decode_image` returns an RGB JPEG *unloaded* (PIL's own lazy open: the header is parsed, the pixels are decoded on
first use, and PIL loads them by itself for any PIL operation), holding its encoded bytes. That lets a transform
first draw its crop and then decode at the smallest scale the crop allows (`uint8_pixels`), with libjpeg-turbo
through `torchvision.io.decode_jpeg` at full scale. A corrupt body is therefore found when the pixels are decoded:
`load_image` and `uint8_pixels` raise `CorruptSample` then, which the loaders catch around the transform too.
Other formats and modes (PNG, grayscale or CMYK JPEG) are decoded and converted to RGB at once, as before.

Beyond 8-bit RGB: a 16-bit PNG (any channel count, read by libpng through `torchvision.io.decode_png`), a PIL image
in a 16-bit or float mode (16-bit grayscale TIFF) and an `.npy` array ([H, W] or [H, W, C]; uint8, uint16 or
float32) come back as a [C, H, W] tensor of their own dtype, never through `convert("RGB")` (which turns 16-bit
pixels white). `LoadPixels(channels)`, the first stage of the float transforms, brings any of these to the model's
channel count and, for tensors, to float in [0, 1] (divided by the dtype's maximum: 255, 65535).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "npy")
FORMAT_OF_KEY = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# attribute of an unloaded JPEG from decode_image holding its encoded bytes (PIL images take extra attributes)
ENCODED = "tessera_encoded"
# DCT-scaled decoding stops while the region is still this many times the output size, and the antialiased resize
# does the rest (PIL's `Image.thumbnail(reducing_gap=2.0)` rule: then the result is hard to tell from a full decode)
REDUCING_GAP = 2.0


# PIL modes with more than 8 bits per pixel: returned as tensors ("I" holds 16-bit PNG/TIFF values on older Pillows)
HIGH_DEPTH_MODES = {"I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I;16N": np.uint16, "I": np.uint16,
                    "F": np.float32}
ARRAY_DTYPES = (np.uint8, np.uint16, np.float32)  # `.npy` sample dtypes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CorruptSample(ValueError):
    """A sample whose image cannot be decoded, or which holds no image at all."""


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')!r} ({sample.get('__url__')})"


def _open(data: bytes, key: str) -> Image.Image:
    """PIL's lazy open, trying the format the key names first (probing every plugin costs ~0.07 ms per image)."""
    guess = FORMAT_OF_KEY.get(key)
    if guess:
        try:
            return Image.open(io.BytesIO(data), formats=[guess])
        except Image.UnidentifiedImageError:
            pass  # mislabelled file: let PIL identify it
    return Image.open(io.BytesIO(data))


def png_bit_depth(data: bytes) -> int | None:
    """Bits per channel of a PNG (its IHDR header), None for anything else."""
    return data[24] if len(data) > 25 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" else None


def array_pixels(data: bytes) -> torch.Tensor:
    """An `.npy` sample ([H, W] or [H, W, C]; uint8, uint16 or float32) as a [C, H, W] tensor of its own dtype."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.dtype not in ARRAY_DTYPES or min(arr.shape) < 1:
        raise ValueError(f"an image array must be [H, W] or [H, W, C] of {[np.dtype(t).name for t in ARRAY_DTYPES]}, "
                         f"got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [C, H, W]


def high_depth_pixels(img: Image.Image) -> torch.Tensor:
    """A loaded PIL image in a 16-bit or float mode as a [1, H, W] uint16 / float32 tensor (values unchanged)."""
    arr = np.asarray(img)
    dtype = HIGH_DEPTH_MODES[img.mode]
    if dtype is np.uint16:
        arr = np.clip(arr, 0, 65535)
    return torch.from_numpy(np.ascontiguousarray(arr.astype(dtype)))[None]  # [1, H, W]


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """Integer pixels as float32 divided by the dtype's maximum (uint8 255, uint16 65535); floats as float32."""
    if x.dtype.is_floating_point:
        return x.float()
    return x.float() / float(torch.iinfo(x.dtype).max)


def decode_image(sample: dict, draft_size: int | None = None) -> Image.Image | torch.Tensor:
    """The sample's image as RGB. Without `draft_size` an RGB JPEG comes back unloaded (see the module docstring);
    with it, JPEGs are decoded at once at the smallest 1/2^k scale whose both sides are still >= draft_size (PIL
    `Image.draft`). Other formats are decoded at full size."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample(f"sample {sample.get('__key__')!r} has no image (keys: {sorted(sample)})")
    data = sample[key]
    try:
        if key == "npy":
            return array_pixels(data)
        if png_bit_depth(data) == 16:  # PIL would keep 8 of the 16 bits of a colour PNG
            return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        img = _open(data, key)
        if img.format == "JPEG" and img.mode == "RGB" and not draft_size:
            setattr(img, ENCODED, bytes(data))
            return img
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if img.mode in HIGH_DEPTH_MODES:
            return high_depth_pixels(img)
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise CorruptSample(f"{_where(sample)}: {exc}") from exc


def decode_label(sample: dict) -> int:
    """The class index stored under `cls` (ASCII integer), or -1 when the sample has none."""
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except ValueError as exc:
        raise CorruptSample(f"sample {sample.get('__key__')!r}: cls is not an integer ({raw[:20]!r})") from exc


def is_unloaded_jpeg(img) -> bool:
    """True for an RGB JPEG from `decode_image` whose pixels have not been decoded yet (PIL empties `tile` on load)."""
    return isinstance(img, Image.Image) and getattr(img, ENCODED, None) is not None and bool(img.tile)


def load_image(img: Image.Image) -> Image.Image:
    """Decode an unloaded image's pixels (PIL `load`), turning a decoding failure into `CorruptSample`."""
    try:
        img.load()
    except Exception as exc:
        raise CorruptSample(f"image cannot be decoded: {exc}") from exc
    return img


def dct_reduction(full: tuple[int, int], region: tuple[int, int], out: tuple[int, int],
                  gap: float = REDUCING_GAP) -> int:
    """The JPEG decode scale divisor (1, 2, 4 or 8) for a `region` (h, w) of an image of size `full` (h, w) that
    will be resized to `out` (h, w): the largest power of two that leaves the region >= gap x out on both sides.
    The crop box is then rounded to the reduced pixel grid: a shift of at most s/2 source pixels, under a quarter
    of an output pixel (an equally likely crop, not a change of the augmentation's distribution)."""
    factor = min(region[0] / out[0], region[1] / out[1]) / gap
    return next((s for s in (8, 4, 2) if factor >= s and min(full) // s >= 1), 1)


def _pil_to_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [C, H, W] tensor over PIL's pixel copy (channels-last strides: what torch's uint8
    resize wants). The array is read-only; nothing writes to it (resizing and copies make new tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def uint8_pixels(img: Image.Image | torch.Tensor, reduce: int = 1) -> tuple[torch.Tensor, float]:
    """Pixels as a uint8 [C, H, W] tensor and the scale they were decoded at (1, or 1/reduce for an unloaded JPEG
    decoded with libjpeg's DCT scaling). Full-scale JPEGs go through `torchvision.io.decode_jpeg`; the result may be
    a channels-last view (callers resize or copy it)."""
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.dim() != 3:
            raise TypeError(f"expected a uint8 [C, H, W] tensor, got {img.dtype} {tuple(img.shape)}")
        return img, 1.0
    if is_unloaded_jpeg(img):
        full_w = img.width
        if reduce > 1:
            img.draft("RGB", (max(1, img.width // reduce), max(1, img.height // reduce)))
        else:
            try:
                encoded = torch.frombuffer(bytearray(getattr(img, ENCODED)), dtype=torch.uint8)
                return decode_jpeg(encoded), 1.0
            except RuntimeError as exc:
                raise CorruptSample(f"JPEG cannot be decoded: {exc}") from exc
        load_image(img)
        return _pil_to_chw(img), img.width / full_w
    load_image(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _pil_to_chw(img), 1.0


class LoadPixels:
    """First stage of the float transforms: the decoded image with the model's `channels`.

    An 8-bit PIL image comes back as a PIL image in mode "RGB" (3 channels) or "L" (1); a tensor (16-bit, float or
    `.npy` pixels) as float32 [C, H, W] in [0, 1] (`unit_float`). One channel is repeated to `channels`, as PIL turns
    grayscale into RGB; any other disagreement is a ValueError naming both counts (a dataset that does not fit
    `model.in_chans`)."""

    def __init__(self, channels: int = 3):
        self.channels = channels

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(img, Image.Image):
            img = load_image(img)
            if self.channels in (1, 3):
                mode = "L" if self.channels == 1 else "RGB"
                return img if img.mode == mode else img.convert(mode)
            img = torch.from_numpy(np.array(img.convert("L") if img.mode in ("L", "P") else img))
            img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)  # [C, H, W]
        x = unit_float(img)
        if x.shape[0] == 1 and self.channels != 1:
            return x.expand(self.channels, -1, -1).contiguous()
        if x.shape[0] != self.channels:
            raise ValueError(f"an image with {x.shape[0]} channels where the model takes {self.channels} "
                             f"(model.in_chans); write the shards with that many channels, or set model.in_chans")
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


__all__ = ["CorruptSample", "IMAGE_KEYS", "LoadPixels", "array_pixels", "decode_image", "decode_label",
           "dct_reduction", "high_depth_pixels", "is_unloaded_jpeg", "load_image", "png_bit_depth", "uint8_pixels",
           "unit_float"]
