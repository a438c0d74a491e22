"""What a masked-image model regresses at each patch: pixels (optionally per-patch normalised) or HOG (MaskFeat).

`PatchTargets(kind, patch_size, in_chans, norm_pix=False, hog_cell=None, hog_bins=9)` is a plain callable (no
weights, nothing in the state dict): `targets(imgs [N, C, H, W]) -> [N, L, targets.dim]` in float32. Pixel vectors are
ordered (p, q, c) as MAE's `patchify`; HOG vectors as `models.hog.hog_patches`. `hog_cell=None` gives 2x2 cells per
patch (MaskFeat's 8 px cells in 16 px patches).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .hog import check_hog, hog_dim, hog_patches

TARGET_KINDS = ("pixels", "hog")


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], per-patch vector ordered (p, q, c) as the official MAE code."""
    p = patch_size
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W] (inverse of `patchify`)."""
    gh, gw = grid_size
    p = patch_size
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=gh, w=gw, p=p, q=p)


def normalise_patches(target: torch.Tensor) -> torch.Tensor:
    """Each patch vector minus its mean, over its unbiased std (+1e-6 in the variance), as MAE's norm_pix_loss."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5


class PatchTargets:
    """The per-patch regression target of one kind; `dim` is its length."""

    def __init__(self, kind: str = "pixels", patch_size: int = 16, in_chans: int = 3, norm_pix: bool = False,
                 hog_cell: int | None = None, hog_bins: int = 9, img_size=None):
        if kind not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {kind!r}")
        if kind == "hog" and norm_pix:
            raise ValueError("norm_pix_loss applies to pixel targets only (HOG histograms are already normalised)")
        self.kind, self.patch_size, self.in_chans, self.norm_pix = kind, patch_size, in_chans, norm_pix
        self.hog_cell = max(1, patch_size // 2) if hog_cell is None else hog_cell
        self.hog_bins = hog_bins
        if kind == "hog":
            check_hog(patch_size if img_size is None else img_size, patch_size, self.hog_cell, hog_bins)
            self.dim = hog_dim(patch_size, in_chans, self.hog_cell, hog_bins)
        else:
            self.dim = patch_size * patch_size * in_chans

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.kind == "hog":
            return hog_patches(imgs, self.patch_size, self.hog_cell, self.hog_bins)
        target = patchify(imgs, self.patch_size).float()
        return normalise_patches(target) if self.norm_pix else target

    def __repr__(self) -> str:
        extra = f", cell {self.hog_cell}, {self.hog_bins} bins" if self.kind == "hog" else f", norm_pix {self.norm_pix}"
        return f"PatchTargets({self.kind}, dim {self.dim}{extra})"


__all__ = ["PatchTargets", "TARGET_KINDS", "patchify", "unpatchify", "normalise_patches"]
