"""Batches onto the training device: uint8 images cross the bus and are normalised there.

`device_batches(loader, device, mean=..., std=...)` wraps any loader of dict batches ("image" plus e.g. "label",
"valid", "n_corrupt"). Every tensor moves to `device`; "image" comes out normalised as `dtype`:

- uint8 [B, C, H, W]: converted on the device, `(x / 255 - mean) / std` in float32 (the same operations, in the same
  order, as torchvision's ToTensor + Normalize on the CPU), then cast to `dtype`;
- floating: taken as already normalised, only moved and cast.

On CUDA the copy of the next `prefetch` batches runs on a side stream while the current step computes (the pattern
of timm's `PrefetchLoader`: copy and normalise on the side stream, make the compute stream wait for it, and
`record_stream` each tensor so the caching allocator does not reuse its memory before the compute stream is done).
Host tensors are pinned first when `pin_memory` is on (default: on for CUDA); pinning in the loader
(`DataLoader(pin_memory=True)`, done by its own thread) is cheaper, and already pinned tensors are not copied again.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Sequence

import torch


@functools.lru_cache(maxsize=32)
def _stats_on(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def _channel_stats(values: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """mean/std as a float32 [C, 1, 1] tensor on x's device (broadcasts over [C,H,W] or [B,C,H,W]). Made once per
    device and cached: a fresh one per batch would be a small pageable copy, which on CUDA makes the host wait
    for the batch copy queued before it on the side stream."""
    return _stats_on(tuple(float(v) for v in values), x.device)


def normalize_on_device(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 image(s) [..., C, H, W] -> `(x / 255 - mean) / std` computed in float32 where x lives, cast to dtype."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 images, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"image shape {tuple(x.shape)} does not match {len(mean)} mean / {len(std)} std channels")
    y = x.to(torch.float32).div_(255.0)
    y.sub_(_channel_stats(mean, y)).div_(_channel_stats(std, y))
    return y if dtype == torch.float32 else y.to(dtype)


def _move(batch: dict, device: torch.device, mean, std, dtype: torch.dtype, pin: bool, side=None) -> dict:
    """The batch with every tensor on `device` (asynchronous copies) and "image" normalised as `dtype`. With `side`
    (the copy stream), tensors already on the GPU are marked as used there, so their memory is not handed back to
    the stream that made them before the side stream has read them."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if side is not None and value.is_cuda:
                value.record_stream(side)
            if pin and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
            if key == "image":
                value = normalize_on_device(value, mean, std, dtype) if value.dtype == torch.uint8 else value.to(dtype)
        out[key] = value
    return out


def _record(batch: dict, stream) -> None:
    """Tell the caching allocator the compute stream uses the tensors made on the side stream."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            value.record_stream(stream)


def device_batches(loader: Iterable[dict], device, *, mean: Sequence[float], std: Sequence[float],
                   dtype: torch.dtype = torch.float32, pin_memory: bool | None = None,
                   prefetch: int = 1) -> Iterator[dict]:
    """Yield the loader's batches on `device`, "image" normalised as `dtype` (see the module docstring).

    `prefetch`: batches copied ahead on a side stream (CUDA only; 0 copies each batch on the compute stream when it
    is needed). `pin_memory`: None means on for CUDA, off otherwise.
    """
    device = torch.device(device)
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    cuda = device.type == "cuda"
    pin = cuda if pin_memory is None else bool(pin_memory)
    if not cuda or prefetch == 0:
        for batch in loader:
            yield _move(batch, device, mean, std, dtype, pin)
        return
    side = torch.cuda.Stream(device=device)
    ahead: collections.deque = collections.deque()
    source = iter(loader)

    def stage() -> bool:
        batch = next(source, None)
        if batch is None:
            return False
        # work queued so far on the compute stream (e.g. a device-resident loader's augmentation of this batch)
        # must finish before the side stream reads it; the copy still overlaps the step launched next
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            ahead.append(_move(batch, device, mean, std, dtype, pin, side))
        return True

    while len(ahead) < prefetch and stage():
        pass
    while ahead:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        batch = ahead.popleft()
        _record(batch, current)
        stage()  # queue the next copy before the caller's step is launched, so they overlap
        yield batch


__all__ = ["device_batches", "normalize_on_device"]
