"""What a checkpoint is drawn as: the ViT encoder to draw attention from, and the MAE when the checkpoint has a decoder
to reconstruct with. Reading is `launch/weights.py`'s (every format, run directories, head counts); this module only
picks the model to draw from what was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import ConfigError, WeightsError
from launch.weights import classifier_model, encoder_model, mae_model, read_weights


@dataclass
class VisualModel:
    """What a checkpoint was read as: the encoder to draw attention from, the MAE when there is a decoder."""

    encoder: torch.nn.Module  # a timm VisionTransformer
    mae: torch.nn.Module | None
    kind: str  # "mae", "encoder", "classifier", "timm"
    path: str
    fmt: str
    arch: dict
    mean: tuple | None = None
    std: tuple | None = None
    notes: list[str] = field(default_factory=list)


def _timm_model(w):
    import timm

    name = w.source[len("timm:"):]
    model = timm.create_model(name, pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(w.state_dict, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{w.path}: the weights do not fit timm's {name}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return model.eval(), (tuple(cfg["mean"]) if cfg.get("mean") else None), (tuple(cfg["std"]) if cfg.get("std")
                                                                              else None)


def load_visual_model(checkpoint: str, *, weights: str | None = None, arch: str | None = None,
                      num_heads: int | None = None, decoder_num_heads: int | None = None,
                      norm_pix_loss: bool | None = None) -> VisualModel:
    """Read `checkpoint` (run folder, weights file, or timm:NAME with `weights`)."""
    if not checkpoint:
        raise ConfigError("checkpoint= is required (a run directory, a weights file or timm:NAME)")
    w = read_weights(checkpoint, want="any", weights=weights, arch=arch, num_heads=num_heads)
    path = str(w.path)
    if checkpoint.startswith("timm:"):
        model, mean, std = _timm_model(w)
        return VisualModel(model, None, "timm", path, "timm", dict(w.encoder_cfg), mean, std)
    mean, std = w.norm
    if w.kind == "classifier":
        model = classifier_model(w)
        encoder = getattr(model, "encoder", model)  # probe: frozen encoder + head; vit: the whole timm model
        return VisualModel(encoder.eval(), None, "classifier", path, w.fmt, dict(w.encoder_cfg), mean, std)
    if w.kind == "pretrainer":
        mae, kwargs = mae_model(w, arch=arch, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                                norm_pix_loss=norm_pix_loss)
        return VisualModel(mae.encoder, mae, "mae", path, w.fmt, kwargs, mean, std, w.notes)
    kind = "classifier" if any(k.startswith(("head.", "fc_norm.")) for k in w.state_dict) else "encoder"
    return VisualModel(encoder_model(w).eval(), None, kind, path, w.fmt, dict(w.encoder_cfg), mean, std, w.notes)


def check_reconstruction_possible(model: VisualModel, reconstruction: str) -> None:
    """reconstruction="yes" needs an MAE decoder; the error names what the checkpoint is instead."""
    if reconstruction == "yes" and model.mae is None:
        what = {"encoder": "encoder-only weights", "classifier": "a classifier", "timm": "timm encoder weights"}
        raise ConfigError(
            f"vis.reconstruction=yes, but {model.path} is {what.get(model.kind, model.kind)} ({model.fmt} format) "
            "without the MAE decoder (decoder_embed, decoder_blocks, decoder_pred), so nothing can be reconstructed. "
            "Expected a full MAE checkpoint: RUN_DIR/mae.safetensors from pretrain/mae.py, or an official "
            "*_full.pth / mae_visualize_*.pth; or set vis.reconstruction=no")


__all__ = ["VisualModel", "load_visual_model", "check_reconstruction_possible"]
