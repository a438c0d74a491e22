"""The linear probe: a frozen encoder, a pooled feature, BatchNorm1d without affine, one Linear, trained by LARS.

As in the MAE recipe: the BatchNorm (eps 1e-6, no affine) only calibrates the feature scale, so one learning rate
fits every encoder; the Linear starts from trunc-normal std 0.01 and zero bias. Only the head trains; the encoder
stays in eval mode with gradients off, whatever `.train()` is called on the whole.

LARS through timm's `Lars`, set up like the MAE/MoCo v3 probe: MoCo v3's LARS adapts the step with the trust ratio
only for parameters with ndim > 1 and applies no weight decay to 1-D ones. timm's `Lars` adapts only when the group's
weight decay is non-zero unless `always_adapt=True`, so weights go in a group with `always_adapt=True` and biases in
a plain momentum-SGD group. With weight decay 0 (the recipe) timm's trust ratio `tc*|w|/(|g| + wd*|w| + eps)` equals
MoCo v3's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.optim import Lars

from finetune.features import encode


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



def build_lars(module: nn.Module, *, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
               trust_coeff: float = 1e-3) -> Lars:
    adapted = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True},
              {"params": plain, "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coeff)



__all__ = ["ProbeHead", "ProbeClassifier", "build_lars"]
