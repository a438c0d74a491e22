"""The ViT encoder: a plain timm `VisionTransformer`, so its weights load wherever timm's do.

`create_encoder(**encoder_cfg)` builds it with MAE's settings (CLS token, qkv bias, LayerNorm eps 1e-6, no head by
default). `timm_model_args(encoder_cfg)` names the matching timm architecture, for
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=0, **kwargs)`.
"""

from functools import partial

from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")

# timm architectures by (embed_dim, depth, num_heads): the widths MAE and DeiT use.
_TIMM_NAMES = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 16): "vit_huge_patch14_224",
}


def create_encoder(
    img_size=224,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    num_classes=0,
    global_pool="token",
    drop_path_rate=0.0,
    **kwargs,
) -> VisionTransformer:
    """A timm VisionTransformer with a CLS token, qkv bias and LayerNorm(eps=1e-6); no head unless num_classes > 0."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"img_size {size} is not divisible by patch_size {patch_size}")
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=True,
        num_classes=num_classes,
        global_pool=global_pool,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(LayerNorm, eps=1e-6),
        **kwargs,
    )


def encoder_cfg_of(model: VisionTransformer) -> dict:
    """Recover the encoder_cfg keys from a built timm VisionTransformer."""
    block = model.blocks[0]
    return dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
    )


def timm_model_args(encoder_cfg: dict) -> tuple[str, dict]:
    """(timm model name, extra create_model kwargs) that build the same architecture as `encoder_cfg`."""
    cfg = {k: encoder_cfg[k] for k in ENCODER_KEYS if k in encoder_cfg}
    key = (cfg.get("embed_dim", 768), cfg.get("depth", 12), cfg.get("num_heads", 12))
    name = _TIMM_NAMES.get(key, "vit_base_patch16_224")
    ref = dict(img_size=224, patch_size=14 if "patch14" in name else 16, in_chans=3,
               embed_dim=key[0] if key in _TIMM_NAMES else 768, depth=key[1] if key in _TIMM_NAMES else 12,
               num_heads=key[2] if key in _TIMM_NAMES else 12, mlp_ratio=4.0)
    extra = {}
    for k, v in cfg.items():
        v = tuple(v) if isinstance(v, (list, tuple)) else v
        same = v == ref[k] or (k == "img_size" and v == (ref[k], ref[k]))
        if not same:
            extra[k] = v
    return name, extra
