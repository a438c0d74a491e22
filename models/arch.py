"""Architectures read from names and from weight shapes: what `launch/weights.py` needs to rebuild a model.

* `encoder_cfg_of_name(arch)`: the encoder architecture (keys of `models.vit.create_encoder`) of an MAE variant name,
  a hybrid ViT registered in `models/hybrid.py`, or `timm:NAME` (a ViT, a hybrid, or a CNN: `{"cnn": NAME, ...}`).
* `infer_encoder_cfg(sd)`: everything a timm-named ViT encoder state dict shows (the head count is not in the shapes).
* `decoder_cfg_of(mae_sd)`: the MAE decoder's width, depth and MLP ratio from its shapes (head counts again not).
* `default_heads(embed_dim, depth)`: the head count published ViTs use for a width (64 per head, ViT-H/14's 16).
"""

from __future__ import annotations

import math
import re

import torch

from core.errors import ConfigError, WeightsError
from models.vit import ENCODER_KEYS

# Head counts of published ViTs whose width is not 64 per head (ViT-H/14: 1280 wide, 32 blocks, 16 heads).
_KNOWN_HEADS = {(1280, 32): 16}


def default_heads(embed_dim: int, depth: int) -> int:
    return _KNOWN_HEADS.get((embed_dim, depth), max(1, embed_dim // 64))


def infer_encoder_cfg(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture visible in a timm-named encoder state dict (everything but the head count)."""
    need = ("patch_embed.proj.weight", "pos_embed")
    missing = [k for k in need if k not in sd]
    if missing:
        raise WeightsError(f"the weights lack {missing}: not a ViT encoder (keys start with {sorted(sd)[:5]})")
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(sd["pos_embed"].shape[1])  # grid*grid + the prefix tokens (cls, and dist when distilled)
    prefix = int("cls_token" in sd) + int("dist_token" in sd)
    grid = math.isqrt(tokens - prefix)
    if grid * grid != tokens - prefix:
        raise WeightsError(f"pos_embed of {tokens} tokens is not a square grid (+{prefix} prefix); non-square "
                           "encoders need an explicit arch=")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise WeightsError("the weights have no blocks.N.* keys: not a ViT encoder")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if "blocks.0.mlp.fc1.weight" in sd else 4.0
    return {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": embed_dim,
            "depth": depth, "mlp_ratio": float(mlp_ratio)}


def decoder_cfg_of(mae_sd: dict[str, torch.Tensor]) -> dict:
    """MaskedAutoencoder decoder kwargs visible in the shapes of a MAE state dict (our key names; no head count)."""
    missing = [k for k in ("decoder_embed.weight", "decoder_pred.weight") if k not in mae_sd]
    if missing:
        raise WeightsError(f"the MAE weights lack {missing}")
    dec_dim = int(mae_sd["decoder_embed.weight"].shape[0])  # [Dd, D]
    depth = 1 + max((int(k.split(".")[1]) for k in mae_sd if k.startswith("decoder_blocks.")), default=-1)
    fc1 = mae_sd.get("decoder_blocks.0.mlp.fc1.weight")
    return {"decoder_embed_dim": dec_dim, "decoder_depth": depth,
            "decoder_mlp_ratio": (fc1.shape[0] / dec_dim) if fc1 is not None else 4.0}


def encoder_cfg_of_name(arch: str) -> dict:
    """Encoder architecture of an MAE variant name (`models.variants`), a hybrid registered in `models/hybrid.py`,
    or `timm:NAME` (a ViT, a hybrid ViT or a CNN)."""
    if arch.startswith("timm:"):
        return _timm_cfg(arch[len("timm:"):])
    from models.hybrid import HYBRID_MODULES, hybrid_encoder_cfg, is_hybrid
    from models.variants import MAE_VARIANTS

    if is_hybrid(arch):
        return hybrid_encoder_cfg(arch)
    if arch not in MAE_VARIANTS:
        import timm

        ours = ", ".join(timm.list_models(module=HYBRID_MODULES[-1]))
        raise ConfigError(f"arch={arch!r} is neither an MAE variant ({', '.join(sorted(MAE_VARIANTS))}), a hybrid "
                          f"({ours}) nor timm:NAME")
    kwargs = dict(MAE_VARIANTS[arch])
    if "encoder_cfg" in kwargs:
        return dict(kwargs["encoder_cfg"])
    return {k: kwargs[k] for k in ENCODER_KEYS if k in kwargs}


def _timm_cfg(name: str) -> dict:
    import timm

    from models.hybrid import hybrid_encoder_cfg, is_hybrid

    if is_hybrid(name):
        return hybrid_encoder_cfg(name)
    try:
        m = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError(f"timm has no model {name!r}: {exc}") from None
    if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
        if hasattr(m, "blocks") or hasattr(m, "patch_embed") or not hasattr(m, "get_classifier"):
            raise ConfigError(f"timm model {name!r} is neither a VisionTransformer, a hybrid ViT nor a CNN classifier")
        size = (getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        return {"cnn": name, "img_size": int(size[-1]), "in_chans": int(size[0])}
    pe = m.patch_embed
    return {"img_size": int(pe.img_size[0]), "patch_size": int(pe.patch_size[0]), "in_chans": int(pe.proj.in_channels),
            "embed_dim": int(m.embed_dim), "depth": len(m.blocks), "num_heads": int(m.blocks[0].attn.num_heads),
            "mlp_ratio": m.blocks[0].mlp.fc1.out_features / m.embed_dim}


def check_fits(cfg: dict, inferred: dict, where: str) -> None:
    """Error naming every architecture field where the weights disagree with the requested model."""
    bad = [f"{k}: model {cfg[k]} vs weights {inferred[k]}" for k in ("patch_size", "in_chans", "embed_dim", "depth",
                                                                     "mlp_ratio")
           if k in cfg and k in inferred and float(cfg[k]) != float(inferred[k])]
    if bad:
        raise WeightsError(f"{where} does not fit the model: " + "; ".join(bad))


__all__ = ["default_heads", "infer_encoder_cfg", "decoder_cfg_of", "encoder_cfg_of_name", "check_fits"]
