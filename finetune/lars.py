"""LARS for the linear probe, through timm's `Lars`, set up like the MAE/MoCo v3 probe.

MoCo v3's LARS adapts the step with the trust ratio only for parameters with ndim > 1 and applies no weight decay to
1-D ones. timm's `Lars` adapts only when the group's weight decay is non-zero unless `always_adapt=True`, so weights
go in a group with `always_adapt=True` and biases in a plain momentum-SGD group. With weight decay 0 (the recipe)
timm's trust ratio `tc*|w|/(|g| + wd*|w| + eps)` equals MoCo v3's.
"""

from __future__ import annotations

import torch.nn as nn
from timm.optim import Lars


def build_lars(module: nn.Module, *, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
               trust_coeff: float = 1e-3) -> Lars:
    adapted = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True},
              {"params": plain, "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coeff)


__all__ = ["build_lars"]
