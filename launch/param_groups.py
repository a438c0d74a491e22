"""Optimizer parameter groups: weight decay only where it belongs, and layer-wise lr decay for ViT fine-tuning.

* No weight decay on parameters with ndim <= 1 (biases, norm weights) nor on position embeddings and the
  cls/mask/register tokens (timm and nanoGPT practice; the official MAE code also exempts them in fine-tuning).
* Layer-wise lr decay (BEiT, MAE fine-tuning): with `num_layers = depth + 1`, `cls_token`/`pos_embed`/`patch_embed`
  get layer 0, `blocks.i` gets layer i + 1, everything else (final norm, head) gets `num_layers`; the group's
  `lr_scale` is `decay ** (num_layers - layer)`. `launch.schedule.apply_lr` multiplies it in.
Parameter names may carry a prefix (`encoder.blocks.3...`, `module.blocks.3...`); only `blocks.<i>` as a whole
dotted component counts, so `decoder_blocks.<i>` is never mistaken for an encoder block.
Written by hand: timm's `param_groups_layer_decay` keys layers by its own model-specific grouping and ignores
name prefixes, which does not fit an MAE whose encoder sits under `encoder.`.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "dist_token", "reg_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(cls_token|pos_embed|patch_embed|dist_token|reg_token)(?:\.|$)")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for parameters that must not be decayed: ndim <= 1 or a position embedding / special token."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


def encoder_depth(model: nn.Module) -> int:
    """Number of encoder blocks, counted from parameter names (`blocks.<i>.`)."""
    ids = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))}
    return max(ids) + 1 if ids else 0


def layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE layer index of a parameter: embeddings 0, `blocks.i` i + 1, the rest `num_layers`."""
    if m := _BLOCK.search(name):
        return int(m.group(1)) + 1
    if _EMBED.search(name):
        return 0
    return num_layers


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Groups for `torch.optim.AdamW(groups, ...)`: keys `params`, `weight_decay`, `lr_scale` (and `layer_id`).

    Frozen parameters (`requires_grad=False`, e.g. the fixed sin-cos position embeddings) are left out.
    """
    num_layers = encoder_depth(model) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not no_weight_decay(name, param)
        lid = layer_id(name, num_layers) if layer_decay is not None else num_layers
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
                           "layer_id": lid}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_adamw(groups: list[dict], optim, *, deepspeed: bool) -> torch.optim.AdamW:
    """torch AdamW over `groups` with `optim`'s betas/eps. Fused (one kernel, CPU and CUDA) unless DeepSpeed runs the
    step: the fused kernels also skip a non-finite update on the device (`launch/nonfinite.py`)."""
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, eps=optim.eps, fused=not deepspeed)


__all__ = ["param_groups", "build_adamw", "no_weight_decay", "layer_id", "encoder_depth", "NO_DECAY_NAMES"]
