"""Continued pretraining: the starting weights of a new run (`model.init_from=`), with a fresh optimizer and schedule.

The weights are read by `launch/weights.py` (a Tessera run directory or its exports, a ZeRO-3 consolidation, an
official MAE `.pth`, a Hugging Face ViTMAE directory, timm ViT weights) under the model's names. What loads
(`warm_start`): the encoder always, every tensor of it, shapes equal; the rest of the model (MAE's decoder, a
SimMIM/data2vec head) when the weights have all of it with the same shapes, else that part starts fresh and the
summary line says so. A disagreement is one line naming the key and both shapes. What shapes do not show is checked
where the source records it: head counts (HF config.json, a run's config.yaml) and the LayerNorm epsilon of an HF
config.json (transformers' default 1e-12 vs our 1e-6; `model.layer_norm_eps` settles it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from core.errors import ConfigError, UserError
from launch.weights import Weights, read_weights, recorded_variant

ENCODER = "encoder."
IGNORED_ENCODER = ("encoder.head.", "encoder.fc_norm.", "encoder.head_drop.")  # a timm classifier's, not the encoder's


def layer_norm_eps(model: nn.Module) -> float | None:
    return next((m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)), None)


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    """The epsilon of every LayerNorm of the model (encoder and decoder)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def _heads(model: nn.Module) -> tuple[int | None, int | None]:
    enc = model.encoder.blocks[0].attn.num_heads
    dec = model.decoder_blocks[0].attn.num_heads if len(getattr(model, "decoder_blocks", ())) else None
    return enc, dec


def _check_recorded(model: nn.Module, src: Weights, eps_given: bool) -> None:
    """What shapes do not show: head counts and (HF) the LayerNorm epsilon."""
    recorded = dict(src.hf_config or {})
    variant = recorded_variant(src.run_config)
    if variant is not None:
        recorded = {k: v for k, v in variant.items() if k in ("num_heads", "decoder_num_heads")}
    enc, dec = _heads(model)
    for key, ours in (("num_heads", enc), ("decoder_num_heads", dec)):
        theirs = recorded.get(key)
        if ours is not None and theirs is not None and int(theirs) != ours:
            where = "model.overrides.num_heads" if key == "num_heads" else "model.overrides.decoder_num_heads"
            raise ConfigError(f"model.init_from={src.path}: the checkpoint has {key}={theirs} but the model {ours} "
                              f"(set {where}={theirs})")
    eps = (src.hf_config or {}).get("layer_norm_eps")
    if eps is not None and not eps_given and eps != layer_norm_eps(model):
        raise ConfigError(
            f"model.init_from={src.path}: its config.json says layer_norm_eps={eps:g} but the model uses "
            f"{layer_norm_eps(model):g}; choose one: model.layer_norm_eps={eps:g} (the checkpoint's numerics) or "
            f"model.layer_norm_eps={layer_norm_eps(model):g} (right for facebook/vit-mae-*, trained with 1e-6 "
            f"although their config.json says 1e-12)")


def _fit(model_sd: dict, sd: dict, keys: list[str]) -> list[str]:
    """The keys of `keys` whose shapes differ between model and checkpoint (missing ones count), as text."""
    bad = []
    for k in keys:
        if k not in sd:
            bad.append(f"{k} missing from the checkpoint (model {list(model_sd[k].shape)})")
        elif tuple(sd[k].shape) != tuple(model_sd[k].shape):
            bad.append(f"{k}: checkpoint {list(sd[k].shape)} vs model {list(model_sd[k].shape)}")
    return bad


def warm_start(model: nn.Module, spec: str, eps: float | None = None) -> str:
    """Load `spec` into `model` (see the module docstring) and return one line saying what was loaded. `eps`: the
    LayerNorm epsilon the user chose (`model.layer_norm_eps`), applied to the model; None: keep the model's."""
    try:
        src = read_weights(spec, want="pretrainer")
    except UserError as exc:  # a config or weights problem: say which key brought the weights
        raise ConfigError(f"model.init_from: {exc}") from None
    if eps is not None:
        set_layer_norm_eps(model, eps)
    _check_recorded(model, src, eps_given=eps is not None)
    own = model.state_dict()
    sd = {k: v for k, v in src.state_dict.items() if not k.startswith(IGNORED_ENCODER)}
    encoder_keys = [k for k in own if k.startswith(ENCODER)]
    bad = _fit(own, sd, encoder_keys)
    extra = sorted(k for k in sd if k.startswith(ENCODER) and k not in own)
    bad += [f"{k} {list(sd[k].shape)} is not in the model" for k in extra]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"model.init_from={src.path} does not fit the model: {bad[0]}{more}; set model.name, "
                          f"model.img_size or model.overrides.* to the checkpoint's architecture")
    rest = [k for k in own if not k.startswith(ENCODER)]
    rest_bad = _fit(own, sd, rest)
    has_decoder = any(k.startswith("decoder_") for k in sd)
    if has_decoder and any(k.startswith("decoder_") for k in rest) and rest_bad:
        raise ConfigError(f"model.init_from={src.path}: its decoder does not fit the model's: {rest_bad[0]}; set "
                          f"model.overrides.decoder_* to the checkpoint's decoder")
    load = encoder_keys + ([] if rest_bad or not rest else rest)
    with torch.no_grad():
        for k in load:
            own[k].copy_(sd[k].to(own[k].dtype))
    unused = sorted({k.split(".")[0] for k in sd if k not in own})
    part = "decoder" if any(k.startswith("decoder_") for k in rest) else "head"
    what = "encoder" if not rest else f"encoder + {part}" if not rest_bad else f"encoder ({part} starts fresh)"
    return (f"init        {src.path} ({src.fmt} format): {what}, {len(load)} tensors"
            + (f"; not used: {', '.join(unused)}" if unused else ""))


__all__ = ["warm_start", "set_layer_norm_eps", "layer_norm_eps"]
