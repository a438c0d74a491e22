"""The pretraining objectives behind `pretrain/mae.py model.objective=...`, and which targets each one takes.

    mae       masked autoencoder: encoder on the visible patches, light decoder (models/mae.py)
    simmim    BEiT/SimMIM-style: encoder on every patch, masked ones as a mask token, linear head, L1
              (models/simmim.py)
    data2vec  student with mask tokens regresses an EMA teacher's top-K block outputs (models/data2vec.py)

Targets (`model.target`): `pixels` (MAE's, optionally per-patch normalised) or `hog` (MaskFeat) for mae and simmim;
data2vec's targets are its teacher's features, so it takes none. Each objective has its own masking default:
random 0.75 for mae (MAE), BEiT block masks at 0.6 for simmim (SimMIM) and data2vec (data2vec's vision recipe).

`create_pretrainer(objective, name, ...)` builds the model from a named variant (`models/variants.py`: the encoder
part of the name is used; simmim and data2vec have no decoder). Every model has `.encoder` (a plain timm ViT under
`encoder.*`), so `models.convert.to_encoder_state_dict` exports each the same way (the file names of a run directory:
`launch/run_files.py`).
Only the model classes import timm, lazily, so config code can import this module cheaply.
"""

from __future__ import annotations

OBJECTIVES = ("mae", "simmim", "data2vec")
TARGETS = {"mae": ("pixels", "hog"), "simmim": ("pixels", "hog"), "data2vec": ()}
DEFAULT_MASKING = {"mae": ("random", 0.75), "simmim": ("block", 0.6), "data2vec": ("block", 0.6)}
DECODER_KEYS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio")


def default_target(objective: str) -> str | None:
    return TARGETS[objective][0] if TARGETS[objective] else None


def check_objective(objective: str, target: str | None, norm_pix_loss: bool = False,
                    overrides: dict | None = None) -> None:
    """Raise ValueError (one line, naming the config keys) for a combination the objectives do not define."""
    if objective not in OBJECTIVES:
        raise ValueError(f"model.objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    allowed = TARGETS[objective]
    if target is not None and target not in allowed:
        what = f"takes model.target {' or '.join(allowed)}" if allowed else "regresses its teacher's features"
        raise ValueError(f"model.objective={objective} {what}, not model.target={target}; "
                         f"{'choose one of those' if allowed else 'leave model.target unset'}")
    if norm_pix_loss and (target or default_target(objective)) != "pixels":
        raise ValueError(f"model.norm_pix_loss=true applies to pixel targets only (model.objective={objective}, "
                         f"model.target={target or default_target(objective)}); set model.norm_pix_loss=false")
    if objective != "mae":
        given = sorted(set(overrides or {}) & set(DECODER_KEYS))
        if given:
            raise ValueError(f"model.overrides.{given[0]} does not apply: model.objective={objective} has no decoder")


def encoder_kwargs(name: str, **overrides) -> dict:
    """A named variant's kwargs without its decoder (the encoder of `mae_vit_tiny_patch4_dec128d2b` etc.)."""
    from .variants import variant_kwargs

    return {k: v for k, v in variant_kwargs(name, **overrides).items() if k not in DECODER_KEYS}


def create_pretrainer(objective: str, name: str, *, target: str | None = None, norm_pix_loss: bool = False,
                      hog_cell: int | None = None, hog_bins: int = 9, loss_beta: float = 2.0, **kwargs):
    """The pretraining model of `objective` on variant `name`; `kwargs` are constructor overrides (img_size,
    mask_ratio, mask_type, mask_min_block, mask_max_block, embed_dim, depth, ...). Masking defaults per objective."""
    check_objective(objective, target, norm_pix_loss, kwargs)
    mask_type, mask_ratio = DEFAULT_MASKING[objective]
    kwargs.setdefault("mask_type", mask_type)
    kwargs.setdefault("mask_ratio", mask_ratio)
    target = target or default_target(objective)
    hog = {"hog_cell": hog_cell, "hog_bins": hog_bins} if target == "hog" else {}
    if objective == "mae":
        from .variants import create_mae

        return create_mae(name, norm_pix_loss=norm_pix_loss, **({"target": target, **hog} if hog else {}), **kwargs)
    if objective == "simmim":
        from .simmim import SimMIM

        return SimMIM(**encoder_kwargs(name, **kwargs), target=target, norm_pix_loss=norm_pix_loss, **hog)
    from .data2vec import Data2VecStudent

    return Data2VecStudent(**encoder_kwargs(name, **kwargs), loss_beta=loss_beta)


def predicts_pixels(model) -> bool:
    """Whether the model's predictions are pixel patches (then the reconstruction grid can draw them)."""
    return getattr(model, "target", None) == "pixels" and hasattr(model, "unpatchify")


def pretrain_flops_per_image(model, teacher_top_k: int | None = None) -> dict:
    """Analytic {"forward", "train"} matmul FLOPs per image of any objective's model (models/flops.py conventions).

    MAE: `mae_flops_per_image`. simmim/data2vec: the encoder on all L patches + CLS, plus the linear head on L
    tokens; data2vec's training adds one teacher forward (no backward) to 3 x the student's forward."""
    from .flops import mae_flops_per_image, vit_flops_per_image

    if hasattr(model, "decoder_cfg"):
        return mae_flops_per_image(model)
    cfg = model.encoder_cfg
    head = 2 * model.num_patches * model.head.in_features * model.head.out_features
    forward = vit_flops_per_image(cfg) + head
    teacher = vit_flops_per_image(cfg) if teacher_top_k else 0
    return {"forward": forward, "train": 3 * forward + teacher}


__all__ = ["OBJECTIVES", "TARGETS", "DEFAULT_MASKING", "check_objective", "create_pretrainer", "default_target",
           "encoder_kwargs", "predicts_pixels", "pretrain_flops_per_image"]
