"""Histograms of oriented gradients (HOG) per image cell, on the device: the MaskFeat target (Wei et al. 2022).

`hog_cells(imgs, cell, bins)` -> [N, C, bins, H/cell, W/cell]: per channel, gradients by fixed [-1, 0, 1] conv filters
(Dalal & Triggs' simple centred difference; reflected border), unsigned orientation (0-180 degrees) in `bins` equal
bins, each pixel's gradient magnitude added to its bin (hard binning, as MaskFeat), summed over the cell's pixels,
then each cell's histogram L2-normalised over its bins. `hog_patches(imgs, patch_size, cell, bins)` arranges the
cells of each patch as one target vector [N, L, (patch/cell)^2 * C * bins], ordered (cell row, cell col, channel, bin).

Every step is a batched tensor op (no loop over pixels or cells, no host read-back), so it runs inside the training
step on any device. Written by hand: torchvision's and timm's transforms have no batched HOG, and scikit-image's runs
on the CPU one image at a time. MaskFeat also weights magnitudes by a Gaussian window over the patch; this one does
not. The histograms are invariant to a per-channel affine change of the pixels (gradients lose the offset, the L2
normalisation the scale), so normalised and raw images give the same target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def hog_dim(patch_size: int, in_chans: int, cell: int, bins: int) -> int:
    """Length of one patch's HOG target vector."""
    return (patch_size // cell) ** 2 * in_chans * bins


def check_hog(img_size, patch_size: int, cell: int, bins: int) -> None:
    """Raise ValueError unless the cells tile the patches (and so the image) exactly."""
    if cell < 1 or bins < 1:
        raise ValueError(f"HOG cell size and bins must be >= 1, got cell {cell}, bins {bins}")
    if patch_size % cell:
        raise ValueError(f"HOG cell size {cell} must divide the patch size {patch_size}")
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(s % cell for s in sizes):
        raise ValueError(f"HOG cell size {cell} must divide the image size {sizes}")


def image_gradients(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel centred differences (gx, gy) [N, C, H, W] by fixed conv filters, reflected border; y points down."""
    c = imgs.shape[1]
    taps = torch.tensor([-1.0, 0.0, 1.0], dtype=imgs.dtype, device=imgs.device)
    wx = taps.view(1, 1, 1, 3).repeat(c, 1, 1, 1)
    wy = taps.view(1, 1, 3, 1).repeat(c, 1, 1, 1)
    padded = F.pad(imgs, (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(padded[:, :, 1:-1, :], wx, groups=c)
    gy = F.conv2d(padded[:, :, :, 1:-1], wy, groups=c)
    return gx, gy


def hog_cells(imgs: torch.Tensor, cell: int, bins: int = 9) -> torch.Tensor:
    """[N, C, H, W] -> L2-normalised orientation histograms [N, C, bins, H/cell, W/cell] (float32)."""
    if imgs.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    if h % cell or w % cell:
        raise ValueError(f"HOG cell size {cell} must divide the image size {(h, w)}")
    with torch.autocast(imgs.device.type, enabled=False):  # float32 whatever the step's precision
        x = imgs.float()
        gx, gy = image_gradients(x)
        magnitude = torch.sqrt(gx * gx + gy * gy)  # [N, C, H, W]
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation in [0, pi]
        index = torch.floor(angle * (bins / math.pi)).long().clamp_(0, bins - 1)  # [N, C, H, W]
        votes = torch.zeros(n, c, bins, h, w, device=x.device).scatter_(2, index.unsqueeze(2), magnitude.unsqueeze(2))
        hist = votes.view(n, c, bins, h // cell, cell, w // cell, cell).sum(dim=(4, 6))  # [N, C, bins, Hc, Wc]
        return F.normalize(hist, p=2.0, dim=2)


def hog_patches(imgs: torch.Tensor, patch_size: int, cell: int, bins: int = 9) -> torch.Tensor:
    """[N, C, H, W] -> HOG target per patch [N, L, (patch/cell)^2 * C * bins], patches in row-major order (float32)."""
    if patch_size % cell:
        raise ValueError(f"HOG cell size {cell} must divide the patch size {patch_size}")
    k = patch_size // cell  # cells per patch side
    hist = hog_cells(imgs, cell, bins)
    return rearrange(hist, "n c b (h i) (w j) -> n (h w) (i j c b)", i=k, j=k)


__all__ = ["hog_cells", "hog_patches", "hog_dim", "check_hog", "image_gradients"]
