"""Saving and rebuilding trained classifiers: `<name>.safetensors` plus `classifier.json` beside it.

classifier.json holds what is needed to rebuild the model without the training config: `kind` ("vit": a timm
VisionTransformer with its head, from fine-tuning; "distilled": timm's VisionTransformerDistilled, DeiT's two heads,
averaged in eval mode; "cnn": a timm CNN trained from scratch; "probe": frozen encoder + BatchNorm/Linear head, or
with `head: "attentive"` the attentive probe of `finetune/attentive_probe.py`, whose `attn_heads` and `include_cls`
are recorded too), the encoder architecture (`encoder_cfg`; a `hybrid` key names a hybrid ViT, `models/hybrid.py`, a
`cnn` key a timm CNN), class count and names, pooling, input size and normalisation, and where the encoder came
from. Fine-tuning also records `timm`: the `timm.create_model` name and kwargs that rebuild the exported weights in
timm (`pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=N)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from launch.config import ConfigError

FORMAT = "tessera-classifier/1"
META_NAME = "classifier.json"


def build_from_meta(meta: dict) -> nn.Module:
    """An untrained model of the architecture `meta` describes."""
    cfg = dict(meta["encoder_cfg"])
    img_size = meta.get("img_size") or cfg.get("img_size")
    if meta["kind"] in ("vit", "distilled", "cnn"):
        from models.classifier import create_classifier

        model = create_classifier(cfg, meta["num_classes"], global_pool=meta.get("global_pool", "token"),
                                  drop_path_rate=0.0, img_size=img_size, distilled=meta["kind"] == "distilled")
        if meta["kind"] == "distilled":
            model.set_distilled_training(True)  # (cls, dist) logits in train mode; their mean in eval mode
        return model
    if meta["kind"] == "probe":
        from finetune.probe import ProbeClassifier
        from models.classifier import create_backbone

        cfg["img_size"] = img_size
        if meta.get("head", "linear") == "attentive":
            from finetune.attentive_probe import AttentiveProbeClassifier

            return AttentiveProbeClassifier(create_backbone(cfg), meta["num_classes"],
                                            include_cls=bool(meta.get("include_cls", False)),
                                            num_heads=meta.get("attn_heads"))
        if meta.get("head", "linear") != "linear":
            raise ConfigError(f"classifier.json: unknown probe head {meta['head']!r} (expected 'linear' or "
                              f"'attentive')")
        return ProbeClassifier(create_backbone(cfg), meta["num_classes"], pool=meta.get("pool", "token"))
    raise ConfigError(f"classifier.json: unknown kind {meta['kind']!r} (expected 'vit', 'distilled', 'cnn' or "
                      f"'probe')")


def save_classifier(state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict) -> Path:
    """Write weights (atomically) and the classifier.json of their directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    (path.parent / META_NAME).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its `classifier_best.safetensors` (else `classifier_last`)."""
    p = Path(path)
    if p.is_dir():
        for name in ("classifier_best.safetensors", "classifier_last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise ConfigError(f"no classifier_best/last.safetensors in {p}")
    if not p.is_file():
        raise ConfigError(f"classifier checkpoint not found: {p}")
    return p


def read_meta(path: Path) -> dict:
    meta_path = path.parent / META_NAME
    if not meta_path.is_file():
        raise ConfigError(f"{path} has no {META_NAME} beside it; it is needed to rebuild the model")
    meta = json.loads(meta_path.read_text())
    for key in ("kind", "encoder_cfg", "num_classes"):
        if key not in meta:
            raise ConfigError(f"{meta_path} lacks '{key}'")
    return meta


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode with the saved weights, meta). Weights of the wrong shape are an error naming keys."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    model = build_from_meta(meta)
    sd = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            more = f"; ... {len(shapes) - 8} more" if len(shapes) > 8 else ""
            parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:8]) + more)
        if missing:
            parts.append(f"missing {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}")
        raise ConfigError(f"checkpoint {path} does not fit the model of its {META_NAME}: " + " | ".join(parts))
    model.load_state_dict(sd)
    model.eval()
    return model, meta


__all__ = ["save_classifier", "load_classifier", "build_from_meta", "resolve_checkpoint", "read_meta", "META_NAME"]
