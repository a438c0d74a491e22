"""Hybrid ViTs: a convolutional stem instead of the linear patch embedding, built from timm's parts.

Two families, both timm `VisionTransformer`s whose `patch_embed` is timm's `HybridEmbed` (a CNN feature map,
flattened into tokens), so the CLS token, blocks, heads and state-dict names are a plain ViT's:
* timm's own hybrids (`timm.models.vision_transformer_hybrid`, ResNet stages as the patch embedding), e.g.
  `vit_small_r26_s32_224` (ResNet-26 stages, total stride 32) or `vit_tiny_r_s16_p8_224`.
* Small convolutional stems suited to 32 px images, registered here as timm models (`vit_tiny_convstem_p4_32`,
  `vit_small_convstem_p4_32`, and `test_vit_convstem_p4_32` for tests): timm's `ConvStem` (ConvNormAct layers,
  BatchNorm + ReLU) of 3x3 convolutions, one at stride 1 and then stride-2 ones up to a total stride of 4 (the patch
  size of the plain ViT-Tiny/4 they replace: an 8x8 grid, 64 tokens), and a last 1x1 convolution into the embedding
  width (the "convolutional stem" of Xiao et al., 2021, "Early convolutions help transformers see better"; the first
  stride-1 conv keeps full resolution for a layer, as CIFAR ResNets do). The stem makes ViT-Tiny/4's forward at
  32 px 7% dearer (740 vs 691 MFLOP, torch's FlopCounterMode); no transformer block is removed to compensate.

Registering the stems with timm (`timm.models.register_model`) keeps exports loadable the timm way: after
`import models.hybrid`, `timm.create_model("vit_tiny_convstem_p4_32", pretrained=True,
pretrained_cfg_overlay=dict(file=..., num_classes=N), num_classes=N)`. `distilled=True` builds timm's
`VisionTransformerDistilled` (DeiT's distillation token and second head) around the same stem.

Masked-image pretraining of a hybrid (pretrain/mae.py, every `model.objective`: mae, simmim, data2vec) is refused
(`pretraining_refusal`): MAE drops the masked patches' tokens and SimMIM/data2vec replace them by a mask token, both
after the patch embedding; a convolutional stem runs on the whole image first, and its overlapping receptive fields
carry the masked pixels into the visible tokens, so the masked content is not hidden. It would be well defined if the
masked input pixels were blanked before the stem (SimMIM applied to pixels, as SparK does for CNNs); pretraining does
not do that.
"""

from __future__ import annotations

import math
from functools import partial

import timm
import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model_in_modules, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem

# timm modules whose models are hybrids: timm's ResNet/conv-stem ViTs and this module (registered as "hybrid")
HYBRID_MODULES = ("vision_transformer_hybrid", __name__.rsplit(".", 1)[-1])
# what create_hybrid passes on to timm.create_model (the rest of an encoder_cfg is description)
HYBRID_KEYS = ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")

__all__ = ["conv_stem", "create_hybrid", "hybrid_encoder_cfg", "is_hybrid", "pretraining_refusal", "HYBRID_MODULES",
           "HYBRID_KEYS"]


def conv_stem(in_chans: int, embed_dim: int, stride: int = 4) -> ConvStem:
    """3x3 conv-BN-ReLU at stride 1, then log2(stride) 3x3 conv-BN-ReLU at stride 2 (widths doubling up to
    embed_dim), then a 1x1 conv to embed_dim (timm's ConvStem leaves its last conv without norm and activation)."""
    k = int(math.log2(stride))
    if stride < 2 or 2 ** k != stride:
        raise ValueError(f"stem stride must be a power of 2 >= 2, got {stride}")
    widths = [max(8, embed_dim // 2 ** (k - i)) for i in range(k + 1)] + [embed_dim]  # e.g. 48, 96, 192, 192
    return ConvStem(in_chans=in_chans, depth=k + 2, channels=tuple(widths), kernel_size=(3,) * (k + 1) + (1,),
                    stride=(1,) + (2,) * k + (1,), norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)


def _cfg(**kwargs) -> dict:
    # untrained architectures: the input size is the one they are built for; mean/std are timm's defaults (a run's
    # classifier.json records the normalisation it trained with)
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "fixed_input_size": True, "first_conv": "patch_embed.backbone.0.conv",
            "classifier": "head", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **kwargs}


default_cfgs = generate_default_cfgs({
    "vit_tiny_convstem_p4_32": _cfg(),
    "vit_small_convstem_p4_32": _cfg(),
    "test_vit_convstem_p4_32": _cfg(),
})


def _create_convstem_vit(variant: str, pretrained: bool, stride: int, model_args: dict, **kwargs):
    args = {"img_size": 32, **model_args, **kwargs}
    distilled = args.pop("distilled", False)
    backbone = conv_stem(args.get("in_chans", 3), args["embed_dim"], stride)
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                embed_layer=partial(HybridEmbed, backbone=backbone, proj=False), patch_size=1, **args)


@register_model
def vit_tiny_convstem_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny (192 wide, 12 blocks, 3 heads) on a stride-4 convolutional stem, 32 px input (64 tokens)."""
    return _create_convstem_vit("vit_tiny_convstem_p4_32", pretrained, 4,
                                dict(embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_convstem_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small (384 wide, 12 blocks, 6 heads) on a stride-4 convolutional stem, 32 px input (64 tokens)."""
    return _create_convstem_vit("vit_small_convstem_p4_32", pretrained, 4,
                                dict(embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def test_vit_convstem_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny one for tests and smoke runs (32 wide, 2 blocks, 2 heads, mlp ratio 2), as timm's `test_vit`."""
    return _create_convstem_vit("test_vit_convstem_p4_32", pretrained, 4,
                                dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0), **kwargs)


def _bare(name: str) -> str:
    return name[len("timm:"):] if name.startswith("timm:") else name


def is_hybrid(name: str) -> bool:
    """Is `name` (with or without a `timm:` prefix) one of timm's hybrid ViTs or a stem registered here?"""
    name = _bare(name)
    return name in timm.list_models() and is_model_in_modules(name, HYBRID_MODULES)


def hybrid_encoder_cfg(name: str, img_size: int | None = None) -> dict:
    """The encoder_cfg of a hybrid: `hybrid` (its timm name) plus the ViT sizes, read from a built model;
    `stride` (input pixels per token side) is description only."""
    name = _bare(name)
    model = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    if not isinstance(getattr(model, "patch_embed", None), HybridEmbed):
        raise ValueError(f"timm model {name!r} is not a hybrid ViT (its patch_embed is not a HybridEmbed)")
    pe, block = model.patch_embed, model.blocks[0]
    side = int(pe.img_size[0])
    return {"hybrid": name, "img_size": side, "in_chans": int(pe.in_chans), "embed_dim": int(model.embed_dim),
            "depth": len(model.blocks), "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim, "stride": side // int(pe.grid_size[0])}


def create_hybrid(encoder_cfg: dict, num_classes: int = 0, global_pool: str = "token", drop_path_rate: float = 0.0,
                  distilled: bool = False) -> VisionTransformer:
    """The hybrid `encoder_cfg` describes (`hybrid_encoder_cfg`), with a head when num_classes > 0; `distilled`:
    timm's VisionTransformerDistilled (stems registered here only: timm's ResNet hybrids have no distilled form)."""
    name = encoder_cfg["hybrid"]
    kwargs = {k: encoder_cfg[k] for k in HYBRID_KEYS if k in encoder_cfg}
    if distilled:
        if not is_model_in_modules(name, HYBRID_MODULES[1:]):
            raise ValueError(f"distillation of timm's {name} is not supported: timm has no distilled form of it to "
                             f"reload the export; use a stem registered in models/hybrid.py "
                             f"(e.g. vit_tiny_convstem_p4_32)")
        kwargs["distilled"] = True
    return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path_rate, **kwargs)


def pretraining_refusal(name: str) -> str | None:
    """The one-line reason masked-image pretraining refuses `name`, or None when it is not a hybrid."""
    if not is_hybrid(name):
        return None
    return (f"model.name={name} is a hybrid ViT (a convolutional patch embedding): masked-image pretraining is not "
            f"defined for it, because the stem sees the whole image and its overlapping receptive fields carry the "
            f"masked pixels into the visible tokens; pretrain a plain ViT (an MAE variant) or train the hybrid with "
            f"finetune/classify.py encoder=random arch={name}")
