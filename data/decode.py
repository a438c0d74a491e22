"""Turn one raw WebDataset sample (dict of bytes) into a PIL image and an integer label.

Decoding is done here rather than by `wds.decode("pil")` so the loaders can (a) use PIL's `draft` mode, which lets
libjpeg decode a large JPEG directly at 1/2, 1/4 or 1/8 scale (much less work when the network input is far smaller
than the stored image), and (b) tell a corrupt image apart from a pipeline error, to count and skip it.
"""

from __future__ import annotations

import io

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class CorruptSample(ValueError):
    """A sample whose image cannot be decoded, or which holds no image at all."""


def decode_image(sample: dict, draft_size: int | None = None) -> Image.Image:
    """Decode the sample's image to RGB. With `draft_size`, JPEGs are decoded at the smallest 1/2^k scale whose
    both sides are still >= draft_size (PIL `Image.draft`); other formats are decoded at full size."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample(f"sample {sample.get('__key__')!r} has no image (keys: {sorted(sample)})")
    try:
        img = Image.open(io.BytesIO(sample[key]))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise CorruptSample(f"sample {sample.get('__key__')!r} ({sample.get('__url__')}): {exc}") from exc


def decode_label(sample: dict) -> int:
    """The class index stored under `cls` (ASCII integer), or -1 when the sample has none."""
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except ValueError as exc:
        raise CorruptSample(f"sample {sample.get('__key__')!r}: cls is not an integer ({raw[:20]!r})") from exc
