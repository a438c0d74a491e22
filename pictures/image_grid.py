"""Tensors to PIL images and PIL images to a labelled grid: un-normalise, upscale, lay out, save as PNG.

PIL (not matplotlib) because these pictures are pixel-exact image tables: each cell is the image itself, upscaled by
an integer factor, which a tool or test can read back cell by cell (`cell_box`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`images * std + mean` per channel, clamped to [0, 1]; accepts [C,H,W] or [N,C,H,W]."""
    x = images.detach().float().cpu()
    shape = (-1, 1, 1) if x.ndim == 3 else (1, -1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(shape)
    if m.numel() != x.shape[-3] or s.numel() != x.shape[-3]:
        raise ValueError(f"mean/std have {m.numel()}/{s.numel()} values but the images have {x.shape[-3]} channels")
    return (x * s + m).clamp(0.0, 1.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [C,H,W] tensor in [0, 1] (C = 1 or 3) as an 8-bit RGB PIL image."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [C,H,W] with C in (1, 3), got shape {tuple(image.shape)}")
    x = image.detach().float().cpu().clamp(0.0, 1.0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    arr = (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # [H, W, 3]
    return Image.fromarray(arr, mode="RGB")


def display_scale(height: int, width: int, min_side: int = 128) -> int:
    """Integer upscale factor so that the shorter side reaches `min_side` (32 px -> 4; 224 px -> 1)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor (keeps patch edges sharp)."""
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def grid(
    rows: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    pad: int = 2,
    font_size: int = 11,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Lay out images in a table (cells sized by the largest image), with optional column titles on top and row
    titles on the left."""
    if not rows or not any(rows):
        raise ValueError("grid needs at least one image")
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    ncols = max(len(r) for r in rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(font_size)
    top = left = 0
    if col_labels:
        top = max(_text_size(probe, t, font)[1] for t in col_labels) + 2 * pad + 2
    if row_labels:
        left = max(_text_size(probe, t, font)[0] for t in row_labels) + 2 * pad
    width = left + ncols * (cell_w + pad) + pad
    height = top + len(rows) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        tw, _ = _text_size(draw, text, font)
        x = left + pad + j * (cell_w + pad) + max(0, (cell_w - tw) // 2)
        draw.text((x, pad), text, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (cell_h + pad)
        if row_labels and i < len(row_labels):
            _, th = _text_size(draw, row_labels[i], font)
            draw.text((pad, y + max(0, (cell_h - th) // 2)), row_labels[i], fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (left + pad + j * (cell_w + pad), y))
    return canvas


def cell_box(index_row: int, index_col: int, cell: tuple[int, int], pad: int = 2, top: int = 0, left: int = 0):
    """The (x0, y0, x1, y1) box of grid cell (row, col) for a grid built with the same `pad`, cell size (w, h) and
    label margins; lets tests and tools read cells back from a saved grid."""
    w, h = cell
    x0 = left + pad + index_col * (w + pad)
    y0 = top + pad + index_row * (h + pad)
    return x0, y0, x0 + w, y0 + h


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
