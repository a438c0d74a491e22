"""Random erasing (Zhong et al. 2017; timm's `RandomErasing`) on a normalised batch, on the device, from a seeded
generator: the fine-tuning recipe's erasing for the uint8 input path.

timm applies erasing after normalisation, in the workers (float path) or on the GPU in its `PrefetchLoader`; the
uint8 path here does the latter. timm's version loops over the batch in Python and draws from the global `random`
and torch RNGs; this one is written by hand to draw every box at once from a `torch.Generator` the caller seeds
(e.g. from the step number), so erasing costs a few kernels per batch and a resumed run erases the same boxes.
Same distribution as timm's: with probability p a sample gets 1..max_count boxes, each of area
U(min_area, max_area) x H x W / count and aspect ratio log-uniform in [min_aspect, 1/min_aspect], the first of 10
draws that fits; the box is filled with N(0, 1) per pixel ("pixel"), per channel ("rand") or zeros ("const").
"""

from __future__ import annotations

import math

import torch

MODES = ("pixel", "rand", "const")
ATTEMPTS = 10


class DeviceRandomErasing:
    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3):
        if mode not in MODES:
            raise ValueError(f"erasing mode must be one of {MODES}, got {mode!r}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.probability = probability
        self.mode = mode
        self.max_count = max_count
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
        """Erase mask [N, 1, H, W] (bool): the union of each sample's boxes."""
        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        apply = rand(n) < self.probability  # [N]
        count = 1 + (rand(n) * self.max_count).long().clamp(max=self.max_count - 1)  # [N] in 1..max_count
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        for k in range(self.max_count):
            u = rand(4, n, ATTEMPTS)
            area = (self.area[0] + u[0] * (self.area[1] - self.area[0])) * (height * width) / count.unsqueeze(1)
            aspect = torch.exp(self.log_aspect[0] + u[1] * (self.log_aspect[1] - self.log_aspect[0]))
            h = torch.round(torch.sqrt(area * aspect)).long()  # [N, A]
            w = torch.round(torch.sqrt(area / aspect)).long()
            fits = (h < height) & (w < width)
            first = fits.float().argmax(dim=1, keepdim=True)  # [N, 1]: first attempt that fits (0 if none does)
            h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
            top = (u[2, :, 0] * (height - h + 1)).long()  # randint(0, H - h) as timm
            left = (u[3, :, 0] * (width - w + 1)).long()
            active = apply & fits.any(dim=1) & (k < count)
            box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                   & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
            mask |= box & active.view(-1, 1, 1)
        return mask.unsqueeze(1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: normalised images [N, C, H, W] (any float dtype) -> a new tensor with the boxes erased."""
        if self.probability <= 0:
            return x
        n, c, height, width = x.shape
        mask = self.boxes(n, height, width, generator, x.device)
        if self.mode == "pixel":
            fill = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        elif self.mode == "rand":
            fill = torch.randn(n, c, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
        else:
            fill = torch.zeros((), device=x.device, dtype=x.dtype)
        return torch.where(mask, fill, x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(p={self.probability}, mode={self.mode}, max_count={self.max_count}, "
                f"area={self.area})")


def erasing_generator(device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (pass e.g. data.seeding.mix_seed(seed, "erase", rank, step))."""
    return torch.Generator(device=device).manual_seed(seed)


__all__ = ["DeviceRandomErasing", "erasing_generator"]
