"""The probes' optimizers: LARS for the linear probe (`build_lars`), AdamW for the attentive one
(`build_attentive_optimizer`).

LARS through timm's `Lars`, set up like the MAE/MoCo v3 probe.

MoCo v3's LARS adapts the step with the trust ratio only for parameters with ndim > 1 and applies no weight decay to
1-D ones. timm's `Lars` adapts only when the group's weight decay is non-zero unless `always_adapt=True`, so weights
go in a group with `always_adapt=True` and biases in a plain momentum-SGD group. With weight decay 0 (the recipe)
timm's trust ratio `tc*|w|/(|g| + wd*|w| + eps)` equals MoCo v3's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import Lars


def build_lars(module: nn.Module, *, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
               trust_coeff: float = 1e-3) -> Lars:
    adapted = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True},
              {"params": plain, "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coeff)


def build_attentive_optimizer(head: nn.Module, lr: float = 0.0, weight_decay: float = 0.05,
                              betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the head's trainable parameters: weight decay on the matrices (key/value projection, classifier),
    none on biases, the LayerNorm and the learned query (a token, like a CLS token). `lr` is set by the loop's
    schedule (`launch.schedule.apply_lr`)."""
    decay, plain = [], []
    for name, p in head.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or name.endswith("latent") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


__all__ = ["build_lars", "build_attentive_optimizer"]
