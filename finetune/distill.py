"""DeiT distillation: the loss (hard or soft) and the frozen teacher it compares against.

The student is timm's `VisionTransformerDistilled` (`models.classifier.create_classifier(..., distilled=True)`): a
distillation token beside CLS, each with its own head. Trained with `set_distilled_training(True)` it returns
`(cls_logits, dist_logits)`; in eval mode it returns their mean, which is what evaluation and the exports see.

Loss (DeiT, Touvron et al. 2021), float32, per micro-batch of N images and C classes:
* CLS head: the run's criterion on the labels (label-smoothing CE, or soft-target CE on mixup/cutmix targets).
* distillation head against the teacher's logits on the same (mixed) images:
  hard: CE(dist_logits, argmax teacher_logits), mean over the batch;
  soft: tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), summed over classes and averaged over the N images
  (`F.kl_div(..., reduction="batchmean", log_target=True)`, as Hinton et al. and timm's TokenDistillationTask; the
  DeiT code sums over the batch and classes and divides by N * C, so its value is this one divided by C).
* total: (1 - alpha) * CLS loss + alpha * distillation loss.

The teacher (`Teacher`) wraps a Tessera classifier (read by `launch/weights.py`) or a timm model built from a
name and a local weights file (`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`).
It is frozen (no parameter requires grad), always in eval mode, runs under the step's autocast, maps the student's
normalised input to its own normalisation (an affine map fixed when it is built) and, when it was trained at another
resolution, resizes the images to it. It is never handed to Accelerate nor attached to the student, so checkpoints
and exports hold the student alone.

Why not timm's tasks: `timm.task.TokenDistillationTask` computes this same loss, but it owns the forward pass of a
training step (student, teacher, criterion, its own DDP wrapping), while here the shared loop (`launch/loop.py`) owns
autocast, accumulation, backward and the non-finite guard and wants a `step_fn(batch) -> loss`; its teacher wrapper
re-checks the normalisation with `torch.equal` on every step (a host-device sync the loop must not have), and it
needs the student's timm `pretrained_cfg`, which a student built from an MAE encoder does not have.
`LogitDistillationTask` distils a plain student's single head (no distillation token), which is not DeiT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from launch.weights import classifier_model, read_weights, timm_classifier

KINDS = ("hard", "soft")


def distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: torch.Tensor, *, kind: str, tau: float, alpha: float,
                      base_criterion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, CLS-head loss, distillation loss), scalars; logits [N, C] (use float32), targets as the criterion
    takes them (labels [N] or soft targets [N, C])."""
    base = base_criterion(cls_logits, targets)
    teacher_logits = teacher_logits.detach()
    if kind == "hard":
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    elif kind == "soft":
        distill = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                           reduction="batchmean", log_target=True) * (tau * tau)
    else:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    return (1.0 - alpha) * base + alpha * distill, base, distill


class Teacher(nn.Module):
    """A frozen classifier seen through the student's input: `teacher(images) -> logits [N, C]` without gradients."""

    def __init__(self, model: nn.Module, *, student_mean, student_std, mean, std, img_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        s_mean, s_std, t_mean, t_std = (torch.tensor([float(v) for v in x], dtype=torch.float64).view(1, -1, 1, 1)
                                        for x in (student_mean, student_std, mean, std))
        # teacher input = (x * s_std + s_mean - t_mean) / t_std = x * scale + shift, decided once, on the host
        self.renormalise = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        self.register_buffer("scale", (s_std / t_std).float(), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).float(), persistent=False)
        self.img_size = img_size
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: no dropout, drop path or BatchNorm updates, ever

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.renormalise:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return self.model(x)


def load_teacher(spec: str, *, weights: str | None, num_classes: int, class_names: list[str] | None,
                 student_mean, student_std, mean=None, std=None) -> tuple[Teacher, dict]:
    """(frozen Teacher in eval mode, description) from `distill.teacher=` (see module docstring)."""
    if spec.startswith("timm:"):
        model, cfg = timm_classifier(spec[len("timm:"):], weights, num_classes, "distill.teacher")
        pe = getattr(model, "patch_embed", None)
        size = int(pe.img_size[0]) if pe is not None and getattr(pe, "strict_img_size", False) else None
        t_mean, t_std = (mean, std) if mean is not None else (cfg.get("mean"), cfg.get("std"))
        info = {"teacher": spec, "weights": str(weights), "arch": spec, "mean": list(t_mean), "std": list(t_std)}
    else:
        w = read_weights(spec, want="classifier")
        model, meta = classifier_model(w), w.meta
        if int(meta["num_classes"]) != num_classes:
            raise ConfigError(f"teacher {spec} has {meta['num_classes']} classes, the data {num_classes}")
        if class_names and meta.get("class_names") and list(meta["class_names"]) != list(class_names):
            raise ConfigError(f"teacher {spec} was trained on classes {meta['class_names'][:5]}..., the data has "
                              f"{list(class_names)[:5]}...: the label order must agree")
        t_mean, t_std, size = meta["mean"], meta["std"], int(meta["img_size"])
        enc = meta["encoder_cfg"]
        arch = enc.get("cnn") or enc.get("hybrid") or f"vit d{enc.get('embed_dim')}x{enc.get('depth')}"
        info = {"teacher": spec, "kind": meta["kind"], "arch": arch, "mean": list(t_mean), "std": list(t_std)}
    teacher = Teacher(model, student_mean=student_mean, student_std=student_std, mean=t_mean, std=t_std,
                      img_size=size)
    info["img_size"] = size
    info["renormalised"] = teacher.renormalise
    return teacher, info


__all__ = ["distillation_loss", "Teacher", "load_teacher", "KINDS"]
