"""Attention maps of a timm VisionTransformer, captured from its real forward pass.

`AttentionRecorder` hooks the `attn_drop` module of every block's timm `Attention`. timm's non-fused path computes
(timm/layers/attention.py, `Attention.forward`):

    q = q * scale;  attn = q @ k.transpose(-2, -1);  attn = maybe_add_mask(...);  attn = attn.softmax(-1)
    attn = self.attn_drop(attn);  x = attn @ v

so the input of `attn_drop` is the post-softmax attention matrix [N, heads, T, T]. The fused path
(`F.scaled_dot_product_attention`) never materialises it, so while recording the recorder switches `fused_attn` off
on those modules and restores each module's flag afterwards. The weights are the trained ones and the code path is
timm's own, so the maps cannot drift from what the model computes.

On top of the raw matrices: `cls_attention_maps` (CLS-to-patch rows on the patch grid) and `attention_rollout`
(Abnar & Zuidema 2020: average heads, add the identity for the residual path, renormalise rows, multiply through
the layers). The rollout is written here because no kept library ships it for timm models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Attention
from torch import nn


def attention_modules(vit: nn.Module) -> list[Attention]:
    """The timm `Attention` module of each block of `vit` (a timm VisionTransformer or anything with `.blocks`)."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a timm VisionTransformer (with .blocks), got {type(vit).__name__}")
    modules = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention):
            raise TypeError(
                f"block {i} has attention {type(attn).__name__}, not timm.layers.Attention; "
                "attention capture only knows timm's standard Attention "
                "(its non-fused path feeds attn_drop the softmax)"
            )
        modules.append(attn)
    return modules


class AttentionRecorder:
    """Context manager that records every block's post-softmax attention during forward passes of `vit`.

        with AttentionRecorder(vit) as rec:
            vit.forward_features(images)
        rec.maps  # one float32 CPU tensor [N, heads, T, T] per block, in block order

    Each forward pass appends one map per block (so two passes give 2 * depth maps). Fused attention is switched off
    while recording and restored on exit, hooks are removed on exit even after an error.
    """

    def __init__(self, vit: nn.Module):
        self.modules = attention_modules(vit)
        self.maps: list[torch.Tensor] = []
        self._handles: list = []
        self._fused: list[bool] = []

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.maps.append(inputs[0].detach().float().cpu())  # [N, heads, T, T], rows sum to 1

    def __enter__(self) -> AttentionRecorder:
        self._fused = [bool(m.fused_attn) for m in self.modules]
        try:
            for m in self.modules:
                m.fused_attn = False
                self._handles.append(m.attn_drop.register_forward_hook(self._hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m, fused in zip(self.modules, self._fused):
            m.fused_attn = fused


@torch.no_grad()
def capture_attention(vit: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Run `vit.forward_features(images)` in eval mode (previous mode restored) and return the attention of every
    block: a list of `depth` tensors [N, heads, T, T] (T = prefix tokens + patches)."""
    was_training = vit.training
    vit.eval()
    try:
        param = next(vit.parameters(), None)
        if param is not None:
            images = images.to(device=param.device, dtype=param.dtype)
        with AttentionRecorder(vit) as rec:
            vit.forward_features(images)
    finally:
        vit.train(was_training)
    return rec.maps


def patch_grid(vit: nn.Module, images: torch.Tensor | None = None) -> tuple[int, int]:
    """(rows, cols) of the patch grid for `images` (or for the model's configured image size)."""
    if images is not None:
        ph, pw = vit.patch_embed.patch_size
        return images.shape[-2] // ph, images.shape[-1] // pw
    gh, gw = vit.patch_embed.grid_size
    return int(gh), int(gw)


def cls_attention_maps(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                       has_cls: bool = True) -> torch.Tensor:
    """CLS-to-patch attention of one block on the patch grid: [N, heads, T, T] -> [N, heads, rows, cols].

    Token 0 is the CLS token when `has_cls`; the patches are the last rows*cols tokens after `num_prefix_tokens`
    prefix tokens (CLS + register tokens), in row-major order. Without a CLS token the query is the mean over all
    tokens (the attention a patch receives on average). The values are the softmax weights themselves (they sum to
    1 with the prefix columns included)."""
    n, heads, t, _ = attn.shape
    rows, cols = grid
    if t != num_prefix_tokens + rows * cols:
        raise ValueError(f"attention over {t} tokens does not fit {num_prefix_tokens} prefix tokens + a "
                         f"{rows}x{cols} grid")
    query = attn[:, :, 0] if has_cls else attn.mean(dim=2)  # [N, heads, T]
    return query[:, :, num_prefix_tokens:].reshape(n, heads, rows, cols)  # [N, heads, rows, cols]


def attention_rollout(attns: Sequence[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through the given blocks, first to last.

    Per block: fuse heads (`mean` or `max`) -> A [N, T, T]; A + I (the residual path); renormalise rows;
    rollout = A_last @ ... @ A_first. Returns [N, T, T]; its rows sum to 1. Computed in float64."""
    if not attns:
        raise ValueError("attention_rollout needs at least one attention map")
    result = None
    for a in attns:
        a = a.double()
        fused = a.mean(dim=1) if head_fusion == "mean" else a.amax(dim=1) if head_fusion == "max" else None  # [N, T, T]
        if fused is None:
            raise ValueError(f"head_fusion must be 'mean' or 'max', got {head_fusion!r}")
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = fused if result is None else fused @ result  # [N, T, T]
    return result.float()


def rollout_cls_map(rollout: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                    has_cls: bool = True) -> torch.Tensor:
    """The CLS row of a rollout [N, T, T] on the patch grid: [N, rows, cols]."""
    return cls_attention_maps(rollout[:, None], grid, num_prefix_tokens, has_cls)[:, 0]


__all__ = [
    "AttentionRecorder",
    "attention_modules",
    "capture_attention",
    "patch_grid",
    "cls_attention_maps",
    "attention_rollout",
    "rollout_cls_map",
]
