"""Per-sample patch masking for MAE: random (argsort of noise) and BEiT-style block-wise masks expressed as noise.

Both mask types go through the same `random_masking` path: the `K = int(L * (1 - ratio))` patches with the smallest
noise are kept. Block-wise masking is written by hand (no library provides a batched BEiT mask generator): it is
vectorised over the batch and over several proposals per round, loops over a fixed number of rounds and never
reads a value back to the host, so no mask type breaks a compiled graph or stalls the GPU.
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
    rounds: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    proposals: int = 4,
    max_block: int | None = None,
) -> torch.Tensor:
    """BEiT-style block-wise mask [N, H, W] (bool, True = masked) with at most `num_masked` patches per sample.

    Each round every sample draws `proposals` rectangles: area ~ U(min_block, min(max_block, remaining budget))
    (`max_block` None: the budget alone, as BEiT's default), aspect ratio
    log-uniform in [min_aspect, 1/min_aspect], uniform position; the first that adds between 1 and `remaining` new
    patches is accepted (BEiT's acceptance rule; BEiT draws one rectangle per round, up to 64 rounds). A fixed
    number of rounds with no early exit and no data-dependent branch: no host synchronisation, so it runs inside
    a compiled graph and on the GPU without stalls. Like BEiT it may stop short of the budget.
    """
    min_block = max(1, min(min_block, (grid_h * grid_w) // 4))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen_dev = generator.device if generator is not None else dev
    u = torch.rand(rounds, 4, n, proposals, generator=generator, device=gen_dev).to(dev)  # every draw at once
    mask = torch.zeros(n, grid_h * grid_w, dtype=torch.bool, device=dev)
    rows = torch.arange(grid_h, device=dev).view(1, 1, grid_h, 1)
    cols = torch.arange(grid_w, device=dev).view(1, 1, 1, grid_w)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    for r in range(rounds):
        remaining = (num_masked - mask.sum(1)).view(n, 1)  # [N, 1]
        upper = remaining.float() if max_block is None else remaining.float().clamp(max=max_block)
        area = min_block + u[r, 0] * (upper - min_block)  # [N, P]: U(min_block, upper), either order
        aspect = torch.exp(log_lo + u[r, 1] * (log_hi - log_lo))
        h = torch.round(torch.sqrt(area * aspect)).long().clamp(1, grid_h)
        w = torch.round(torch.sqrt(area / aspect)).long().clamp(1, grid_w)
        top = (u[r, 2] * (grid_h - h + 1)).long()  # [N, P] in [0, H - h]
        left = (u[r, 3] * (grid_w - w + 1)).long()
        rect = (
            (rows >= top[..., None, None]) & (rows < (top + h)[..., None, None])
            & (cols >= left[..., None, None]) & (cols < (left + w)[..., None, None])
        ).flatten(2)  # [N, P, H*W]
        new = (rect & ~mask.unsqueeze(1)).sum(2)  # [N, P]
        ok = (new > 0) & (new <= remaining)
        first = ok.float().argmax(dim=1)  # [N]: first acceptable proposal (0 if none: then not applied)
        chosen = rect[torch.arange(n, device=dev), first]  # [N, H*W]
        mask |= chosen & ok.any(dim=1, keepdim=True)
    return mask.view(n, grid_h, grid_w)


def block_mask_noise(
    n: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_block: int = 16,
    max_block: int | None = None,
) -> torch.Tensor:
    """Noise [N, H*W] whose argsort removes BEiT-style blocks first.

    Block patches get noise in [1, 2), the rest in [0, 1); `random_masking` then removes exactly L - K patches:
    all block patches, topped up at random where the blocks fell short of the budget.
    """
    length = grid_h * grid_w
    num_masked = length - num_kept(length, mask_ratio)
    blocks = block_mask(n, grid_h, grid_w, num_masked, min_block=min_block, generator=generator, device=device,
                        max_block=max_block)
    uniform = torch.rand(n, length, generator=generator, device=generator.device if generator else blocks.device)
    return blocks.flatten(1).to(uniform.device).float() + uniform  # [N, L]


def sample_noise(seed: int, *, grid_h: int, grid_w: int, mask_type: str, mask_ratio: float, min_block: int = 16,
                 max_block: int | None = None) -> dict[str, torch.Tensor]:
    """One sample's masking noise {"noise": [H*W]} from its own seed (random or BEiT block masks): given to the
    training stream as its per-sample function (`functools.partial` of this), so a sample gets the same mask wherever
    and by whichever process it is read."""
    generator = torch.Generator().manual_seed(seed)
    if mask_type == "block":
        noise = block_mask_noise(1, grid_h, grid_w, mask_ratio, generator=generator, min_block=min_block,
                                 max_block=max_block)[0]
    else:
        noise = torch.rand(grid_h * grid_w, generator=generator)
    return {"noise": noise}  # [L]


def mask_from_noise(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The mask [N, L] (float32, 1 = masked) that `random_masking` makes from `noise`, without gathering tokens:
    for objectives whose encoder sees every position (BEiT/SimMIM-style mask tokens)."""
    keep = num_kept(noise.shape[1], mask_ratio)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # [N, L] rank of each patch, smallest noise first
    return (ranks >= keep).float()
