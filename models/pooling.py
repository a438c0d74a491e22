"""The feature of a ViT encoder: its tokens after the final norm, pooled to one vector per image.

`pool="token"` takes the CLS token, `"avg"` the mean of the patch tokens (the prefix tokens, CLS and any
distillation or register tokens, left out).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """`[N, T, D]` tokens after the final norm -> `[N, D]`: the CLS token, or the mean of the patch tokens."""
    if pool == "token":
        return tokens[:, 0]  # [N, D]
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)  # [N, D]
    raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")


def encode(encoder: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """Features of a batch through a timm VisionTransformer (`forward_features` ends with the final norm), or the
    encoder's own pooled feature when it has one (raw pixels: `models/pixel_encoder.py`)."""
    if hasattr(encoder, "pooled"):
        return encoder.pooled(images)  # [N, F]
    tokens = encoder.forward_features(images)  # [N, 1+L, D]
    return pool_tokens(tokens, pool, getattr(encoder, "num_prefix_tokens", 1))


def patch_tokens(encoder: nn.Module, images: torch.Tensor, include_prefix: bool = False) -> torch.Tensor:
    """Tokens of a batch after the final norm: `[N, L, D]` patch tokens, or `[N, prefix+L, D]` with the CLS (and any
    register) tokens first when `include_prefix` (what the attentive probe attends over)."""
    tokens = encoder.forward_features(images)  # [N, prefix+L, D]
    return tokens if include_prefix else tokens[:, getattr(encoder, "num_prefix_tokens", 1):]  # [N, L, D]


__all__ = ["pool_tokens", "encode", "patch_tokens"]
