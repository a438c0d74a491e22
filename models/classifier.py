"""Fine-tuning classifier: the MAE encoder (a timm VisionTransformer) with a classification head.

`global_pool="token"` uses the CLS token after the final norm; `"avg"` is MAE's fine-tuning default: mean of patch
tokens -> new `fc_norm`, encoder `norm` removed (timm's own avg-pool layout). The head starts at
trunc_normal(std=2e-5), zero bias, as the official fine-tuning code. `load_encoder_into` accepts any checkpoint
format `convert.py` reads and resizes the position embedding when the fine-tuning grid differs.
"""

import math

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .convert import to_encoder_state_dict
from .state_check import check_state_dict
from .vit import ENCODER_KEYS, create_encoder


def create_classifier(encoder_cfg: dict, num_classes: int, global_pool: str = "token", drop_path_rate: float = 0.0,
                      img_size=None) -> VisionTransformer:
    """timm ViT with a head; `img_size` overrides the encoder's (position embeddings are resized on load)."""
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    cfg = {k: v for k, v in encoder_cfg.items() if k in ENCODER_KEYS}
    if img_size is not None:
        cfg["img_size"] = img_size
    model = create_encoder(**cfg, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


def load_encoder_into(model: VisionTransformer, state_dict: dict) -> dict:
    """Load pretrained encoder weights (any supported format) into a classifier built by create_classifier.

    New head (and fc_norm for avg pooling) stay freshly initialised; with avg pooling the checkpoint's final
    `norm` is dropped, as MAE fine-tuning does. Returns {"loaded", "missing", "ignored", "resized"}.
    Raises CheckpointMismatch naming every other disagreeing key and shape.
    """
    sd = dict(to_encoder_state_dict(state_dict))
    ignored = []
    if isinstance(model.norm, nn.Identity):  # avg pooling: fc_norm replaces norm
        ignored += [k for k in sd if k.startswith("norm.")]
    ignored += [k for k in sd if k.startswith("fc_norm.") and isinstance(model.fc_norm, nn.Identity)]
    for k in ignored:
        sd.pop(k)
    resized = None
    old = sd.get("pos_embed")
    prefix = model.num_prefix_tokens
    if old is not None and old.ndim == 3 and old.shape[-1] == model.pos_embed.shape[-1] \
            and old.shape[1] != model.pos_embed.shape[1]:
        side = math.isqrt(max(old.shape[1] - prefix, 0))
        if side * side == old.shape[1] - prefix:  # square source grid; anything else is reported below
            new_grid = list(model.patch_embed.grid_size)
            # bicubic without antialiasing, as MAE's interpolate_pos_embed
            sd["pos_embed"] = resample_abs_pos_embed(old.float(), new_size=new_grid, old_size=[side, side],
                                                     num_prefix_tokens=prefix, interpolation="bicubic",
                                                     antialias=False).to(old.dtype)
            resized = {"pos_embed": ([side, side], new_grid)}
    report = check_state_dict(model, sd, allow_missing=("head", "fc_norm"))
    model.load_state_dict(sd, strict=False)
    return {"loaded": len(sd), "missing": report["missing"], "ignored": ignored, "resized": resized}
