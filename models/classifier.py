"""Fine-tuning classifier: the MAE encoder (a timm VisionTransformer) with a classification head.

`global_pool="token"` uses the CLS token after the final norm; `"avg"` is MAE's fine-tuning default: mean of patch
tokens -> new `fc_norm`, encoder `norm` removed (timm's own avg-pool layout). The head starts at
trunc_normal(std=2e-5), zero bias, as the official fine-tuning code. `load_encoder_into` accepts any checkpoint
format `convert.py` reads and resizes the position embedding when the fine-tuning grid differs.

Other architectures an `encoder_cfg` may describe: `distilled=True` gives timm's `VisionTransformerDistilled` (DeiT:
a distillation token beside CLS with its own head; in eval mode the output is the mean of the two heads), built
from timm's `deit_tiny_distilled_patch16_224` entry with every size given; an encoder_cfg with a `hybrid` key is a
hybrid ViT (`models/hybrid.py`); one with a `cnn` key is a timm CNN (any timm model name, e.g. `resnet18`, trained
from scratch, e.g. as a distillation teacher). `timm_args` names the timm entry that rebuilds each of them, for
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=N), **kwargs)`
(`num_classes` in the overlay too, else timm drops the head's weights as belonging to another class count).
"""

import math

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .convert import to_encoder_state_dict
from .hybrid import HYBRID_KEYS, create_hybrid
from .state_check import check_state_dict
from .vit import ENCODER_KEYS, create_encoder, timm_model_args

DISTILLED_TIMM_NAME = "deit_tiny_distilled_patch16_224"  # every size is passed explicitly: any width/depth/patch


def timm_args(encoder_cfg: dict, num_classes: int, global_pool: str = "token", distilled: bool = False,
              drop_path_rate: float = 0.0) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) of the classifier `encoder_cfg` describes (see module docstring)."""
    if "cnn" in encoder_cfg:
        kwargs = {"num_classes": num_classes, "in_chans": encoder_cfg.get("in_chans", 3)}
        return encoder_cfg["cnn"], {**kwargs, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {})}
    common = {"num_classes": num_classes, "global_pool": global_pool,
              **({"drop_path_rate": drop_path_rate} if drop_path_rate else {})}
    if "hybrid" in encoder_cfg:
        sizes = {k: encoder_cfg[k] for k in HYBRID_KEYS if k in encoder_cfg}
        return encoder_cfg["hybrid"], {**sizes, **common, **({"distilled": True} if distilled else {})}
    cfg = {k: v for k, v in encoder_cfg.items() if k in ENCODER_KEYS}
    if distilled:
        return DISTILLED_TIMM_NAME, {**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}, **common}
    name, extra = timm_model_args(cfg)
    return name, {**extra, **common}


def init_heads(model: nn.Module, std: float) -> None:
    """trunc-normal(std) weights and zero biases for every linear head (DeiT-distilled models have two)."""
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if isinstance(head, nn.Linear):
            trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)


def create_classifier(encoder_cfg: dict, num_classes: int, global_pool: str = "token", drop_path_rate: float = 0.0,
                      img_size=None, distilled: bool = False) -> nn.Module:
    """timm ViT with a head; `img_size` overrides the encoder's (position embeddings are resized on load).
    `distilled`: VisionTransformerDistilled (token pooling only); hybrid and CNN encoder_cfgs: see module docstring."""
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if distilled and global_pool != "token":
        raise ValueError("a distilled classifier reads the class and distillation tokens: global_pool must be 'token'")
    if distilled and "cnn" in encoder_cfg:
        raise ValueError(f"a CNN ({encoder_cfg['cnn']}) has no distillation token; distil into a ViT")
    cfg = dict(encoder_cfg)
    if img_size is not None:
        cfg["img_size"] = img_size
    if "cnn" in cfg:
        name, kwargs = timm_args(cfg, num_classes, drop_path_rate=drop_path_rate)
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif "hybrid" in cfg:
        model = create_hybrid(cfg, num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
                              distilled=distilled)
    elif distilled:
        name, kwargs = timm_args(cfg, num_classes, global_pool, distilled=True, drop_path_rate=drop_path_rate)
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        cfg = {k: v for k, v in cfg.items() if k in ENCODER_KEYS}
        model = create_encoder(**cfg, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)
    with torch.no_grad():
        init_heads(model, 2e-5)
    return model


def build_classifier_from_meta(meta: dict) -> nn.Module:
    """An untrained model of the architecture a classifier.json describes: `kind` "vit" (a timm ViT with its head),
    "distilled" (VisionTransformerDistilled: (cls, dist) logits in train mode, their mean in eval mode), "cnn", or
    "probe" (frozen encoder + BatchNorm/Linear head, `models/probe.py`). ValueError for an unknown kind."""
    cfg = dict(meta["encoder_cfg"])
    img_size = meta.get("img_size") or cfg.get("img_size")
    if meta["kind"] in ("vit", "distilled", "cnn"):
        pool = meta.get("pool", meta.get("global_pool", "token"))  # "global_pool": files written before round 3
        model = create_classifier(cfg, meta["num_classes"], global_pool=pool,
                                  drop_path_rate=0.0, img_size=img_size, distilled=meta["kind"] == "distilled")
        if meta["kind"] == "distilled":
            model.set_distilled_training(True)
        return model
    if meta["kind"] == "probe":
        from .probe import ProbeClassifier

        cfg["img_size"] = img_size
        head = meta.get("head", "linear")
        if head == "attentive":
            from .probe import AttentiveProbeClassifier

            return AttentiveProbeClassifier(create_backbone(cfg), meta["num_classes"],
                                            include_cls=bool(meta.get("include_cls", False)),
                                            num_heads=meta.get("attn_heads"))
        if head != "linear":
            raise ValueError(f"unknown probe head {head!r} (expected 'linear' or 'attentive')")
        return ProbeClassifier(create_backbone(cfg), meta["num_classes"], pool=meta.get("pool", "token"))
    raise ValueError(f"unknown classifier kind {meta['kind']!r} (expected 'vit', 'distilled', 'cnn' or 'probe')")


def create_backbone(encoder_cfg: dict) -> VisionTransformer:
    """The headless encoder (num_classes=0) of a plain or hybrid ViT encoder_cfg, e.g. for a linear probe."""
    if "cnn" in encoder_cfg:
        raise ValueError(f"encoder_cfg names a CNN ({encoder_cfg['cnn']}); probing needs a ViT encoder")
    if encoder_cfg.get("pixels"):
        from .pixel_encoder import PixelEncoder

        return PixelEncoder(encoder_cfg["img_size"], encoder_cfg["patch_size"], encoder_cfg.get("in_chans", 3))
    if "hybrid" in encoder_cfg:
        return create_hybrid(encoder_cfg, 0)
    return create_encoder(**{k: v for k, v in encoder_cfg.items() if k in ENCODER_KEYS})


def add_dist_token(sd: dict) -> bool:
    """A checkpoint without a distillation token, made to fit a distilled model, in place (DeiT-style start): the
    distillation token starts as a copy of the CLS token and takes a copy of the CLS slot of the position
    embedding (placed second, as timm orders the prefix tokens). True when it changed `sd`."""
    if "dist_token" in sd or "cls_token" not in sd:
        return False
    sd["dist_token"] = sd["cls_token"].clone()
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)  # [1, 2 + L, D]
    return True


def drop_dist_token(sd: dict) -> bool:
    """A DeiT-distilled encoder made to fit a model without a distillation token, in place: `dist_token` and its
    slot of the position embedding (second, after CLS, as timm orders the prefix tokens) are removed; the CLS token
    and the patch positions stay. True when it changed `sd`."""
    if "dist_token" not in sd:
        return False
    sd.pop("dist_token")
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "cls_token" in sd:
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # [1, 1 + L, D]
    return True


def load_encoder_into(model: VisionTransformer, state_dict: dict) -> dict:
    """Load pretrained encoder weights (any supported format) into a classifier built by create_classifier.

    New head (and fc_norm for avg pooling) stay freshly initialised; with avg pooling the checkpoint's final
    `norm` is dropped, as MAE fine-tuning does. A distilled model gets its distillation token from the CLS token
    (`add_dist_token`); a distilled checkpoint loaded into a plain model loses its own (`drop_dist_token`).
    Returns {"loaded", "missing", "ignored", "resized", "dist_token"}.
    Raises CheckpointMismatch naming every other disagreeing key and shape.
    """
    sd = dict(to_encoder_state_dict(state_dict))
    if getattr(model, "dist_token", None) is not None:
        dist = "copied from cls_token" if add_dist_token(sd) else None
    else:
        dist = "dropped (the model has none)" if drop_dist_token(sd) else None
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
    report = check_state_dict(model, sd, allow_missing=("head", "head_dist", "fc_norm"))
    model.load_state_dict(sd, strict=False)
    return {"loaded": len(sd), "missing": report["missing"], "ignored": ignored, "resized": resized,
            "dist_token": dist}
