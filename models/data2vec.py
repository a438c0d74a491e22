"""data2vec for images (Baevski et al. 2022): a student regresses, at its masked positions, the layer-normalised
average of the top-K block outputs of an EMA teacher that sees the whole image. No tokenizer, no pixels.

`Data2VecStudent(**encoder_cfg, mask_ratio, mask_type, loss_beta, ...)`: BEiT-style masked encoder
(`models/mask_token_vit.py`) + a linear regression head D -> D (`head`). `forward(imgs, targets, mask_ratio=None,
noise=None) -> (loss, pred [N, L, D], mask [N, L])`; `targets` [N, L, D] come from the teacher. Loss per masked
token: Smooth L1 with `loss_beta` (MSE when 0) summed over the D channels and scaled by 1/sqrt(D), as data2vec;
averaged over the masked tokens.

`EmaTeacher(student_encoder, top_k, decay, end_decay, schedule, total_steps)`: the EMA copy of the student's timm
encoder, kept by timm's `ModelEmaV3` (foreach lerp, no host syncs; its parameters never require grad). `update(
student_encoder, step)` after every optimizer step moves it with the momentum `ema_decay_at(step, ...)` (0.999 ->
0.9999 linearly over the run, data2vec's default; or cosine, as BYOL). `targets(imgs)` (no grad): every one of the
top-K blocks' outputs (patch tokens) instance-normalised over the tokens, averaged, then layer-normalised over the
channels (data2vec's vision recipe; block outputs here are the blocks' residual outputs). The teacher is not part of
the student module: the entry point registers it for checkpointing so a resume continues it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from .mask_token_vit import MaskTokenViT, masked_mean

EMA_SCHEDULES = ("linear", "cosine")


class Data2VecStudent(MaskTokenViT):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, mask_ratio=0.6, mask_type="block", loss_beta=2.0, mask_min_block=16,
                 mask_max_block=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                         mask_type=mask_type, mask_min_block=mask_min_block, mask_max_block=mask_max_block)
        if loss_beta < 0:
            raise ValueError(f"loss_beta must be >= 0 (0: MSE), got {loss_beta}")
        self.loss_beta = loss_beta
        self.head = nn.Linear(embed_dim, embed_dim)  # data2vec's final projection
        self.initialize_weights()

    def forward_loss(self, pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pred, targets = pred.float(), targets.float()
        if self.loss_beta == 0:
            per_token = F.mse_loss(pred, targets, reduction="none")
        else:
            per_token = F.smooth_l1_loss(pred, targets, reduction="none", beta=self.loss_beta)
        per_token = per_token.sum(dim=-1) / math.sqrt(pred.shape[-1])  # [N, L]
        return masked_mean(per_token, mask)

    def forward(self, imgs: torch.Tensor, targets: torch.Tensor, mask_ratio=None, noise=None):
        """-> (loss, pred [N, L, D], mask [N, L] float32, 1 = masked); `targets` [N, L, D] from the teacher."""
        mask = self.make_mask(imgs, mask_ratio, noise)
        tokens = self.encode(imgs, mask)[:, self.encoder.num_prefix_tokens:]
        pred = self.head(tokens)
        if targets.shape != pred.shape:
            raise ValueError(f"teacher targets have shape {tuple(targets.shape)}, predictions {tuple(pred.shape)}")
        return self.forward_loss(pred, targets, mask), pred, mask


def ema_decay_at(step: int, total_steps: int, start: float = 0.999, end: float = 0.9999,
                 schedule: str = "linear") -> float:
    """Teacher momentum after update `step` (1-based) of `total_steps`: `start` at 0, `end` from `total_steps` on."""
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"EMA schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_targets(encoder, imgs: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, L, D] float32: top-K block outputs (patch tokens) instance-normed over tokens, averaged, layer-normed."""
    with torch.no_grad():
        outs = encoder.forward_intermediates(imgs, indices=top_k, norm=False, output_fmt="NLC",
                                             intermediates_only=True)  # top_k x [N, L, D], prefix tokens dropped
        normed = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in outs]
        avg = torch.stack(normed).mean(dim=0)
        return F.layer_norm(avg, avg.shape[-1:])


class EmaTeacher(nn.Module):
    def __init__(self, student_encoder: nn.Module, top_k: int = 6, decay: float = 0.999, end_decay: float = 0.9999,
                 schedule: str = "linear", total_steps: int = 1):
        super().__init__()
        depth = len(student_encoder.blocks)
        if not 1 <= top_k <= depth:
            raise ValueError(f"top_k must be between 1 and the encoder depth {depth}, got {top_k}")
        for name, value in (("decay", decay), ("end_decay", end_decay)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"EMA {name} must be in [0, 1], got {value}")
        ema_decay_at(0, total_steps, decay, end_decay, schedule)  # validates the schedule name
        self.top_k, self.schedule, self.total_steps = top_k, schedule, total_steps
        self.start, self.end = decay, end_decay
        self.ema = ModelEmaV3(student_encoder, decay=decay)
        self.ema.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        return self.ema.module

    def decay_at(self, step: int) -> float:
        return ema_decay_at(step, self.total_steps, self.start, self.end, self.schedule)

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, step: int) -> float:
        """teacher <- d * teacher + (1 - d) * student, d = the momentum after update `step`; returns d."""
        self.ema.decay = self.decay_at(step)
        self.ema.update(student_encoder)  # step=None: timm uses self.decay as given (no warm-up formula)
        return self.ema.decay

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        weights = next(self.encoder.parameters())
        return teacher_targets(self.encoder, imgs.to(weights.dtype), self.top_k)


__all__ = ["Data2VecStudent", "EmaTeacher", "ema_decay_at", "teacher_targets", "EMA_SCHEDULES"]
