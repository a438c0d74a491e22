"""The reconstruction picture of an MAE: one row per image, original | masked | reconstruction | reconstruction
with the visible patches pasted back.

Pretraining calls `save_reconstruction_grid` every so often on a fixed batch with a fixed seed, so the same patches
are masked each time and the pictures of one run can be compared step by step; `pictures/visualize.py` reuses it for
MAE checkpoints. The caller passes the bare model: under DDP, Accelerate or DeepSpeed that is
`accelerator.unwrap_model(model)` (the function calls `patchify`/`unpatchify`, which a wrapper does not expose).
Under DeepSpeed ZeRO-3 the parameters are sharded, so every rank has to make the call (only one needs to write).

Model interface used (models/mae.py): `forward(images, mask_ratio=, noise=) -> (loss, pred [N,L,p*p*C], mask [N,L])`,
`patchify`, `unpatchify`, `norm_pix_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pictures.image_grid import denormalize, display_scale, grid, save_png, to_pil, upscale

MASK_GREY = 0.5  # display value of the removed patches in the "masked" column
COLUMNS = ("original", "masked", "reconstruction", "recon + visible")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _bare(model: nn.Module) -> nn.Module:
    """The MAE itself: the caller should pass `accelerator.unwrap_model(model)`; a `.module` wrapper (DDP,
    DataParallel, DeepSpeed engine) is looked through as a courtesy."""
    seen = model
    while not hasattr(seen, "patchify") and isinstance(getattr(seen, "module", None), nn.Module):
        seen = seen.module
    for attr in ("patchify", "unpatchify"):
        if not hasattr(seen, attr):
            raise TypeError(
                f"save_reconstruction_grid needs the bare MAE (with .{attr}); got {type(model).__name__}. "
                "Pass accelerator.unwrap_model(model)."
            )
    return seen


def masking_noise(n: int, num_patches: int, seed: int) -> torch.Tensor:
    """The fixed per-patch noise [n, L] (from a generator seeded with `seed`) that decides which patches are masked."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, num_patches, generator=generator)


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, mask_ratio: float = 0.75,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the MAE on `images` (normalised [N,C,H,W]) with the masking fixed by `seed`.

    Returns float32 CPU tensors in the normalised space of the input: `original`, `reconstruction`, `pasted`
    (reconstruction on the masked patches, the original on the visible ones), all [N,C,H,W], and `mask` [N,1,H,W]
    (1 = removed). The model runs in eval mode; its previous mode is restored afterwards.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a batch [N,C,H,W], got shape {tuple(images.shape)}")
    model = _bare(model)
    device, dtype = _model_device_dtype(model)
    was_training = model.training
    model.eval()
    try:
        original = images.detach().float().to(device)  # the caller's values, not a low-precision copy
        x = original.to(dtype)
        target = model.patchify(original)  # [N, L, p*p*C]
        if hasattr(model, "make_noise"):  # the model's own mask type (random or block), from a seeded generator
            generator = torch.Generator().manual_seed(seed)
            noise = model.make_noise(x.shape[0], device=device, generator=generator, mask_ratio=mask_ratio)
        else:
            noise = masking_noise(x.shape[0], target.shape[1], seed).to(device)
        _, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
        pred = pred.float()  # [N, L, p*p*C]
        if getattr(model, "norm_pix_loss", False):
            # The model predicts each patch normalised by its own mean and (unbiased) variance, as in the loss. To show
            # pixels we undo that with the statistics of the TRUE target patch, as the official visualisation does:
            # so the colour/brightness of a masked patch comes from the ground truth, only its structure is predicted.
            mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased like the loss
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        recon = model.unpatchify(pred)  # [N, C, H, W]
        patch_dim = target.shape[-1]
        mask_px = model.unpatchify(mask.float()[..., None].expand(-1, -1, patch_dim))  # [N, C, H, W]
        mask_px = mask_px[:, :1]  # [N, 1, H, W], identical over channels
        pasted = torch.where(mask_px.bool(), recon, original)
    finally:
        model.train(was_training)
    return {
        "original": original.cpu(),
        "reconstruction": recon.cpu(),
        "pasted": pasted.cpu(),
        "mask": mask_px.cpu(),
    }


def save_reconstruction_grid(
    model: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float = 0.75,
    seed: int = 0,
    scale: int | None = None,
    labels: bool = True,
) -> Path:
    """Write the reconstruction grid of `model` (the bare MAE, see the module docstring) on `images`
    (normalised [N,C,H,W]) to `path` as PNG and return the path.

    Columns: original | masked (removed patches grey) | reconstruction | reconstruction with the visible patches
    pasted back. `mean`/`std` undo the input normalisation; `scale` is the nearest-neighbour upscale factor (default:
    enough for 128 px, so 32 px images are drawn 4x). `labels` adds the column titles.
    """
    out = reconstruct(model, images, mask_ratio=mask_ratio, seed=seed)
    original = denormalize(out["original"], mean, std)
    recon = denormalize(out["reconstruction"], mean, std)
    pasted = denormalize(out["pasted"], mean, std)
    masked = torch.where(out["mask"].bool(), torch.full_like(original, MASK_GREY), original)
    factor = scale if scale is not None else display_scale(original.shape[-2], original.shape[-1])
    rows = [
        [upscale(to_pil(col[i]), factor) for col in (original, masked, recon, pasted)]
        for i in range(original.shape[0])
    ]
    titles = list(COLUMNS)
    titles[1] = f"masked {mask_ratio:.0%}"
    picture = grid(rows, col_labels=titles if labels else None)
    return save_png(picture, path)


__all__ = ["save_reconstruction_grid", "reconstruct", "masking_noise", "MASK_GREY", "COLUMNS"]
