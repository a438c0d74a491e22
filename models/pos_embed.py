"""Fixed 2-D sine-cosine position embeddings (MAE style) for a grid of patches.

Layout follows the official MAE release, which released checkpoints depend on: the first D/2 channels encode the
column (w) index, the last D/2 the row (h) index; each half is [sin(pos * omega) | cos(pos * omega)] with
omega_k = 1 / 10000^(k / (D/4)). Rows of the table are patches in row-major order (h outer, w inner), matching
timm's PatchEmbed flattening; an optional all-zero first row serves the CLS token.
"""

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] table [sin | cos], computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega  # [D/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [M, D]


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Table of shape [(1 +) grid_h * grid_w, embed_dim], float32; the CLS row (if any) is zeros."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # [H*W] row index of each patch (row-major)
    cols = torch.arange(grid_w).repeat(grid_h)  # [H*W] column index of each patch
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)  # [H*W, D]
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)  # [1+H*W, D]
    return table.float()
