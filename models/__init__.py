"""Tessera models: timm ViT encoder, masked autoencoder, named variants, classifier, FLOPs and weight interop.

Names are imported lazily (PEP 562), so `python models/convert.py` and `import models.hf_keys` do not pay for
importing timm; `from models import create_mae` works as usual.
"""

import importlib

_EXPORTS = {
    "create_classifier": "classifier", "load_encoder_into": "classifier",
    "detect_format": "convert", "load_mae_weights": "convert", "load_state_dict": "convert",
    "save_encoder": "convert", "to_encoder_state_dict": "convert", "to_hf_state_dict": "convert",
    "to_mae_state_dict": "convert",
    "mae_flops_per_image": "flops", "vit_flops_per_image": "flops",
    "MaskedAutoencoder": "mae",
    "block_mask_noise": "masking", "random_masking": "masking",
    "sincos_2d": "pos_embed",
    "CheckpointMismatch": "state_check", "check_state_dict": "state_check",
    "MAE_VARIANTS": "variants", "create_mae": "variants",
    "create_encoder": "vit", "timm_model_args": "vit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
