"""Analytic matmul FLOPs per image (2 FLOPs per multiply-add) for MAE pretraining and plain ViTs.

Counted: patch embedding (a conv = one matmul per patch), per block qkv / attention scores / attention-weighted sum /
output projection / MLP, the MAE decoder embedding and pixel head. Not counted (as usual for MFU figures): LayerNorm,
GELU, softmax, residual adds, the loss, and a classification head. Training = 3 x forward (backward ~ 2 x forward).
"""

from .variants import MAE_VARIANTS


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward matmul FLOPs of one pre-norm transformer block over `tokens` tokens."""
    hidden = int(dim * mlp_ratio)
    qkv = 2 * tokens * dim * 3 * dim
    attn = 2 * 2 * tokens * tokens * dim  # Q K^T and A V, all heads together
    proj = 2 * tokens * dim * dim
    mlp = 2 * 2 * tokens * dim * hidden
    return qkv + attn + proj + mlp


def _grid(cfg: dict) -> int:
    size = cfg.get("img_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    p = cfg.get("patch_size", 16)
    return (h // p) * (w // p)


def _patch_embed_flops(cfg: dict, patches: int) -> int:
    p = cfg.get("patch_size", 16)
    return 2 * patches * cfg.get("in_chans", 3) * p * p * cfg.get("embed_dim", 768)


def vit_flops_per_image(encoder_cfg: dict, tokens: int | None = None) -> int:
    """Forward FLOPs of a plain ViT: patch embed on all patches + blocks over `tokens` (default patches + CLS)."""
    patches = _grid(encoder_cfg)
    tokens = patches + 1 if tokens is None else tokens
    dim = encoder_cfg.get("embed_dim", 768)
    blocks = encoder_cfg.get("depth", 12) * block_flops(tokens, dim, encoder_cfg.get("mlp_ratio", 4.0))
    return _patch_embed_flops(encoder_cfg, patches) + blocks


def mae_flops_per_image(model, mask_ratio: float | None = None) -> dict:
    """MAE FLOPs per image: {"forward", "train", "encoder", "decoder"}.

    `model`: a MaskedAutoencoder, or a variant name / kwargs dict (nothing is built, so ViT-L/H cost nothing).
    The encoder embeds all L patches, then runs on K = int(L * (1 - ratio)) kept patches + CLS; the decoder runs
    on L + 1 tokens.
    """
    if isinstance(model, str):
        model = MAE_VARIANTS[model]
    if isinstance(model, dict):
        enc = {k: model[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                     "mlp_ratio") if k in model}
        dec = dict(embed_dim=model.get("decoder_embed_dim", 512), depth=model.get("decoder_depth", 8),
                   mlp_ratio=model.get("decoder_mlp_ratio") or model.get("mlp_ratio", 4.0))
        default_ratio = model.get("mask_ratio", 0.75)
    else:
        enc, dec, default_ratio = model.encoder_cfg, model.decoder_cfg, model.mask_ratio
    ratio = default_ratio if mask_ratio is None else mask_ratio
    patches = _grid(enc)
    kept = int(patches * (1 - ratio))
    dim, ddim = enc.get("embed_dim", 768), dec["embed_dim"]
    p, chans = enc.get("patch_size", 16), enc.get("in_chans", 3)
    encoder = vit_flops_per_image(enc, tokens=kept + 1)
    decoder = (2 * (kept + 1) * dim * ddim  # decoder_embed on CLS + kept tokens
               + dec["depth"] * block_flops(patches + 1, ddim, dec["mlp_ratio"])
               + 2 * (patches + 1) * ddim * p * p * chans)  # pixel head (the CLS row is computed, then dropped)
    forward = encoder + decoder
    return {"forward": forward, "train": 3 * forward, "encoder": encoder, "decoder": decoder}
