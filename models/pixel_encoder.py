"""Raw pixels in the place of a frozen encoder: the yardstick every probe and the k-NN monitor compare features with.

`encoder=pixels arch=NAME` (the architecture gives the image size, patch size and channels) makes the probes read
the normalised image itself, with no parameters:

* the pooled feature (what the k-NN monitor's `knn_top1_pixels` and the linear probe read): the image average-pooled
  to `PIXEL_POOL` x `PIXEL_POOL` per channel and flattened, `[N, C * 64]`: at 32 px that is 4 x 4 pixel cells, coarse
  enough that cosine similarity compares colour layout rather than exact pixels, and the same small vector at 224 px;
* the tokens (what the attentive probe attends over): the image's non-overlapping patches of the architecture's patch
  size, flattened, `[N, L, p * p * C]`, after one prefix slot of zeros (where a ViT has its CLS token).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

PIXEL_POOL = 8


def pixel_features(images: torch.Tensor, size: int = PIXEL_POOL) -> torch.Tensor:
    """Normalised images `[N, C, H, W]` -> `[N, C * size * size]` float32: the raw-pixel feature."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)  # [N, C, size, size] -> [N, C*size*size]


class PixelEncoder(nn.Module):
    """No parameters; `pooled(images)` and `forward_features(images)` as the module docstring says."""

    num_prefix_tokens = 1

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {img_size}")
        grid = img_size // patch_size
        self.patch_size, self.in_chans = patch_size, in_chans
        self.patch_embed = SimpleNamespace(num_patches=grid * grid, grid_size=(grid, grid), img_size=(img_size,) * 2,
                                           patch_size=(patch_size,) * 2)
        self.embed_dim = patch_size * patch_size * in_chans  # token width
        self.feature_dim = PIXEL_POOL * PIXEL_POOL * in_chans  # pooled width

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_features(images)  # [N, C*64]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        tokens = rearrange(images.float(), "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)  # [N, L, p*p*C]
        return torch.cat([tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2]), tokens], dim=1)  # [N, 1+L, D]


__all__ = ["PixelEncoder", "pixel_features", "PIXEL_POOL"]
