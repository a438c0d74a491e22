"""Per-sample patch masking for MAE: random (argsort of noise) and BEiT-style block-wise masks expressed as noise.

Both mask types go through the same `random_masking` path: the `K = int(L * (1 - ratio))` patches with the smallest
noise are kept. Block-wise masking is written by hand (no library provides a batched BEiT mask generator): it is
vectorised over the batch, looping only over placement rounds, never over samples.
"""

import math

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, as the official MAE computes it."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep the patches with the smallest noise.

    x: [N, L, D] patch tokens. noise: [N, L] (uniform if None; small = keep).
    Returns x_kept [N, K, D], mask [N, L] (float32, 1 = removed), ids_restore [N, L] (long).
    The mask stays float32 under autocast/bf16 so that mask.sum() counts exactly.
    """
    n, length, dim = x.shape
    keep = num_kept(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # [N, L] patch indices, kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L] rank of each patch in the shuffle
    ids_keep = ids_shuffle[:, :keep]  # [N, K]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D]
    mask = (ids_restore >= keep).float()  # [N, L]: a patch is removed iff its rank is >= K
    return x_kept, mask, ids_restore


def block_mask(
    n: int,
    grid_h: int,
    grid_w: int,
    num_masked: int,
    min_block: int = 16,
    min_aspect: float = 0.3,
    rounds: int = 64,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """BEiT-style block-wise mask [N, H, W] (bool, True = masked) with at most `num_masked` patches per sample.

    Each round every unfinished sample proposes one rectangle: area ~ U(min_block, remaining budget), aspect ratio
    log-uniform in [min_aspect, 1/min_aspect], uniform position; it is accepted when it adds between 1 and
    `remaining` new patches (as BEiT's generator). Like BEiT it may stop short of the budget.
    """
    min_block = max(1, min(min_block, (grid_h * grid_w) // 4))
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device if generator else dev)

    mask = torch.zeros(n, grid_h, grid_w, dtype=torch.bool, device=dev)
    rows = torch.arange(grid_h, device=dev).view(1, grid_h, 1)
    cols = torch.arange(grid_w, device=dev).view(1, 1, grid_w)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    for _ in range(rounds):
        count = mask.flatten(1).sum(1)  # [N]
        remaining = num_masked - count  # [N]
        if not bool((remaining > 0).any()):
            break
        u = rand(4, n).to(dev)
        area = min_block + u[0] * (remaining.float() - min_block)  # U(min_block, remaining), either order
        aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
        h = torch.round(torch.sqrt(area * aspect)).long().clamp(1, grid_h)  # [N]
        w = torch.round(torch.sqrt(area / aspect)).long().clamp(1, grid_w)
        top = (u[2] * (grid_h - h + 1)).long()  # [N] in [0, H - h]
        left = (u[3] * (grid_w - w + 1)).long()
        rect = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + h).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + w).view(-1, 1, 1))
        )  # [N, H, W]
        new = (rect & ~mask).flatten(1).sum(1)  # [N]
        accept = (new > 0) & (new <= remaining)
        mask |= rect & accept.view(-1, 1, 1)
    return mask


def block_mask_noise(
    n: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_block: int = 16,
) -> torch.Tensor:
    """Noise [N, H*W] whose argsort removes BEiT-style blocks first.

    Block patches get noise in [1, 2), the rest in [0, 1); `random_masking` then removes exactly L - K patches:
    all block patches, topped up at random where the blocks fell short of the budget.
    """
    length = grid_h * grid_w
    num_masked = length - num_kept(length, mask_ratio)
    blocks = block_mask(n, grid_h, grid_w, num_masked, min_block=min_block, generator=generator, device=device)
    uniform = torch.rand(n, length, generator=generator, device=generator.device if generator else blocks.device)
    return blocks.flatten(1).to(uniform.device).float() + uniform  # [N, L]
