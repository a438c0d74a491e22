"""Named MAE variants: one plain dict from name to constructor kwargs; names carry the hyperparameters.

`mae_vit_<size>_patch<p>_dec<width>d<depth>b`. The 224 px variants use the official dec512d8b decoder (16 heads).
The 32 px variants (CIFAR-size data) default to img_size=32 and use small decoders: with only 64 (patch 4) or 256
(patch 2) tokens, a 512-wide 8-block decoder would cost several times the encoder. The MAE paper finds a shallow
decoder (1-2 blocks) loses little for fine-tuning, and MAE-Lite trains ViT-Tiny with a 96-wide single block, so the
patch-4 decoders are about 2/3 of the encoder width and 2-4 blocks deep (enough for readable reconstructions).
The patch-2 Tiny variant follows the public CIFAR-10 ViT-T/2 MAE recipe (192-wide, 4-block decoder, 89.8% FT).
"""

import difflib

from .mae import MaskedAutoencoder

_DEC512 = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)

MAE_VARIANTS: dict[str, dict] = {
    # 224 px, ImageNet-style
    "mae_vit_tiny_patch16_dec512d8b": dict(img_size=224, patch_size=16, **_TINY, **_DEC512),
    "mae_vit_small_patch16_dec512d8b": dict(img_size=224, patch_size=16, **_SMALL, **_DEC512),
    "mae_vit_base_patch16_dec512d8b": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                           **_DEC512),
    "mae_vit_large_patch16_dec512d8b": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                            **_DEC512),
    "mae_vit_huge_patch14_dec512d8b": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                           **_DEC512),
    # 32 px, CIFAR-style
    "mae_vit_tiny_patch4_dec128d2b": dict(img_size=32, patch_size=4, **_TINY,
                                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "mae_vit_small_patch4_dec256d4b": dict(img_size=32, patch_size=4, **_SMALL,
                                           decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_tiny_patch2_dec192d4b": dict(img_size=32, patch_size=2, **_TINY,
                                          decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3),
}


def unknown_variant(name: str, key: str = "model.name") -> str:
    """The one-line message for a config's `key=name` that is no variant: the closest names, then all of them."""
    close = difflib.get_close_matches(name, list(MAE_VARIANTS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}={name} is no MAE variant; {hint}the variants: {', '.join(sorted(MAE_VARIANTS))}"


def variant_kwargs(name: str, **overrides) -> dict:
    """Constructor kwargs of a named variant, with overrides (img_size, in_chans, norm_pix_loss, mask_ratio, ...)."""
    if name not in MAE_VARIANTS:
        raise KeyError(f"unknown MAE variant {name!r}; known: {', '.join(sorted(MAE_VARIANTS))}")
    return {**MAE_VARIANTS[name], **overrides}


def create_mae(name: str, **overrides) -> MaskedAutoencoder:
    """Build a named variant; keyword overrides replace the variant's defaults."""
    return MaskedAutoencoder(**variant_kwargs(name, **overrides))
