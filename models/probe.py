"""The linear probe's model: a frozen encoder, a pooled feature, BatchNorm1d without affine, one Linear.

As in the MAE recipe: the BatchNorm (eps 1e-6, no affine) only calibrates the feature scale, so one learning rate
fits every encoder; the Linear starts from trunc-normal std 0.01 and zero bias. Only the head trains; the encoder
stays in eval mode with gradients off, whatever `.train()` is called on the whole. (Trained by LARS:
`finetune/lars.py`.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from models.pooling import encode


class ProbeHead(nn.Sequential):
    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self[1].weight, std=init_std)
        nn.init.zeros_(self[1].bias)


class ProbeClassifier(nn.Module):
    """`encoder` (timm VisionTransformer, frozen) + `head` (ProbeHead); `forward(images) -> logits [N, C]`."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "token",
                 head: ProbeHead | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = head if head is not None else ProbeHead(encoder.embed_dim, num_classes)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> ProbeClassifier:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encode(self.encoder, images, self.pool)  # [N, D]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.head[1].weight.dtype  # bf16 when DeepSpeed converted the head
        return self.head(self.features(images).to(dtype))  # [N, C]


__all__ = ["ProbeHead", "ProbeClassifier"]
