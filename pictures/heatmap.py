"""Heat maps over images: bilinear upsampling of a [h, w] map, min-max scaling, colours from a matplotlib colormap,
and an alpha blend over the picture."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def colormap(values: torch.Tensor | np.ndarray, name: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] (any shape S, clipped) to uint8 RGB colours [*S, 3] with matplotlib's colormap `name`."""
    if name not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {name!r}; use a matplotlib colormap name such as 'viridis' or 'jet'")
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    flat = matplotlib.colormaps[name](np.clip(v.ravel(), 0.0, 1.0))  # [prod(S), 4] floats in [0, 1]
    rgba = flat.reshape(*v.shape, 4)  # a 0-d input too (matplotlib answers a scalar with a tuple)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)  # rounded (matplotlib's bytes=True truncates)


def upsample_map(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a [h, w] map to `size` = (H, W)."""
    x = heat.detach().float().cpu()[None, None]  # [1, 1, h, w]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0]  # [H, W]


def normalize_map(heat: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] for display (a constant map becomes all zeros)."""
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "viridis") -> Image.Image:
    """Blend a colourised heat map [h, w] (any positive scale) over `image`; the map is upsampled bilinearly and
    min-max scaled. `alpha` is the weight of the heat map."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat_full = normalize_map(upsample_map(heat, (image.height, image.width)))
    colours = Image.fromarray(colormap(heat_full, cmap), mode="RGB")
    return Image.blend(image.convert("RGB"), colours, alpha)
