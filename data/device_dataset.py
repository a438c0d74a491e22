"""A small dataset held on the training device as uint8 and augmented there: the loader for CIFAR-scale data.

`build_device_loader(spec, batch_size=..., img_size=..., device=...)` decodes every image of the split once (all
must share one size, e.g. CIFAR-10's 32 px), keeps them as one uint8 [N, C, H, W] tensor on the device (CIFAR-10
train: 154 MB) and yields the same batches as `data.train_stream.TrainLoader` does: `{"image": uint8 [B, C, S, S],
"label": [B], "position": int64 [B], "n_corrupt": int}` (no keys), already on the device, so
`data.device_input.device_batches` only normalises. No worker processes, no decoding, no host-to-device copies per
step: the loader stops being the bottleneck of a GPU recipe on a small dataset.

Augmentation, on the device, whole batch at once: RandomResizedCrop (torchvision's rule: area U(scale), log-uniform
aspect ratio, first of 10 draws that fits, else the center crop) resampled with `grid_sample` (bilinear or
bicubic, no antialiasing: meant for crops that are upsampled or mildly downsampled, as CIFAR's 32 px crops to
32 px), and horizontal flip. Written by hand: torchvision's v2 transforms draw one box per call, not per sample.

Order and randomness follow the global position, as in the shard stream (data/train_stream.py), so they do not
depend on the world size: epoch e is a permutation of the N images drawn from mix_seed(seed, "device-perm", e) (a
CPU generator), the global stream is epoch 0's order, then epoch 1's, ..., and rank r's micro-batch b (of a loader
started at cursor c0) is global positions c0 + (b*W + r)*m ... + m. Crops and flips are keyed by (seed, epoch,
image index): at an epoch's first use its table of boxes [N, 4] and flips [N] is drawn at once on the device from a
generator seeded with mix_seed(seed, "device-crop", e) (one call; the same on every rank of one device type), and a
batch indexes it. `sample_fn(seed)` extras (as the shard stream's) are made per image once per epoch on the host
(seed mix_seed(seed, "sample", epoch, image index)) and moved to the device in one copy. `state_dict` /
`load_state_dict` hold the cursor (global samples consumed), in the stream's format;
resume is exact at any world size or micro-batch.

Size check before decoding: the split's size as uint8 RGB is estimated as sample count x image shape (dataset.json's
`num_samples` and `image_size`; without `image_size` the first image is decoded to learn it), and a split over
`max_gb` is refused in one line (`DatasetError`) before anything else is decoded. When the count is unknown (a bare
shard pattern), decoding stops as soon as the images decoded so far pass the limit. With a known count the images
are decoded straight into one preallocated tensor (no list of images plus a stacked copy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import webdataset as wds

from data.decode import CorruptSample, decode_image, decode_label, uint8_pixels
from data.info import DatasetError, DatasetInfo, resolve
from data.seeding import mix_seed

log = logging.getLogger(__name__)
ATTEMPTS = 10
MODES = ("bilinear", "bicubic")
ORDER_VERSION = "tessera-device-order/1"  # recorded in the state: a shard-stream checkpoint is refused here


def _samples(urls: Sequence[str]) -> Iterator[tuple[str, dict]]:
    for url in urls:
        for sample in wds.tarfile_samples(iter([{"url": url}])):
            yield url, sample


def _decoded(sample: dict) -> tuple[torch.Tensor, int]:
    pixels, _ = uint8_pixels(decode_image(sample))
    return pixels, decode_label(sample)


def split_image_shape(info: DatasetInfo) -> tuple[int, int, int]:
    """The [C, H, W] shape the device loader holds each image of the split in (uint8 RGB): dataset.json's
    `image_size` with 3 channels when recorded, else the shape of the split's first decodable image."""
    size = (info.meta or {}).get("image_size")
    if size:
        return (3, int(size[0]), int(size[1]))
    for _, sample in _samples(info.urls):
        try:
            return tuple(_decoded(sample)[0].shape)
        except CorruptSample:
            continue
    raise DatasetError(f"no decodable image in {', '.join(info.urls[:3])}{', ...' if len(info.urls) > 3 else ''}")


def _what(spec, info: DatasetInfo) -> str:
    """The split named for a message: the spec as given, with its split when the spec does not name it."""
    where = info.urls[0] if isinstance(spec, DatasetInfo) else str(spec)
    return f"{where} (split {info.split})" if info.split and not where.endswith(f":{info.split}") else where


def _too_big(what: str, count: str, shape, size: float, limit_gb: float) -> DatasetError:
    c, h, w = shape
    return DatasetError(f"{what}: {count} images of {c}x{h}x{w} take {size / 2**30:.1f} GiB as uint8, over the device "
                        f"loader's {limit_gb:g} GiB limit; use the shard stream: data.loader=stream")


def load_split_uint8(spec, max_gb: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image of a split as uint8 [N, C, H, W] (shard order), labels [N] (-1 unlabelled), and the number of
    samples skipped because they could not be decoded. With `max_gb`, a split whose estimated size (count x shape)
    is larger is refused (`DatasetError`) before decoding more than one image; when the count is unknown, as soon as
    the images decoded so far pass it."""
    info = spec if isinstance(spec, DatasetInfo) else resolve(spec)
    what = _what(spec, info)
    shape = split_image_shape(info)
    per_image = math.prod(shape)
    limit = math.inf if max_gb is None else max_gb * 2**30
    if info.num_samples is not None and info.num_samples * per_image > limit:
        raise _too_big(what, f"{info.num_samples:,}", shape, info.num_samples * per_image, max_gb)
    # known count: decode straight into one tensor; unknown: a list, stacked at the end
    images = torch.empty((info.num_samples, *shape), dtype=torch.uint8) if info.num_samples else []
    labels, skipped, n = [], 0, 0
    for url, sample in _samples(info.urls):
        try:
            pixels, label = _decoded(sample)
        except CorruptSample as exc:
            skipped += 1
            log.warning("device dataset: skipping %s", exc)
            continue
        if tuple(pixels.shape) != shape:
            raise DatasetError(f"{url}: image {sample.get('__key__')!r} is {tuple(pixels.shape)}, the first was "
                               f"{shape}; the device loader needs images of one size (write the shards at one size, "
                               "or use the shard stream: data.loader=stream)")
        if isinstance(images, list):
            if (n + 1) * per_image > limit:
                raise _too_big(what, f"more than {n:,}", shape, (n + 1) * per_image, max_gb)
            images.append(pixels.contiguous())
        elif n < len(images):
            images[n] = pixels
        else:
            raise DatasetError(f"{what} holds more images than the {len(images):,} its dataset.json lists; rewrite "
                               "the split with data/make_shards.py")
        labels.append(label)
        n += 1
    if n == 0:
        raise DatasetError(f"no decodable image in {', '.join(info.urls[:3])}{', ...' if len(info.urls) > 3 else ''}")
    images = torch.stack(images) if isinstance(images, list) else images[:n]
    return images, torch.tensor(labels, dtype=torch.long), skipped


def crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator, device) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes [N, 4] (top, left, h, w) as float, torchvision's rule, drawn at once."""
    u = torch.rand(4, n, ATTEMPTS, generator=generator, device=device)
    area = height * width * (scale[0] + u[0] * (scale[1] - scale[0]))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(u[2].gather(1, first).squeeze(1) * (height - h + 1))
    left = torch.floor(u[3].gather(1, first).squeeze(1) * (width - w + 1))
    # torchvision's fallback when no draw fits: the largest center crop within the ratio range
    in_ratio = width / height
    cw = float(width) if in_ratio <= ratio[1] else float(round(height * ratio[1]))
    ch = float(height) if in_ratio >= ratio[0] else float(round(width / ratio[0]))
    ok = fits.any(dim=1)
    h = torch.where(ok, h, torch.full_like(h, ch))
    w = torch.where(ok, w, torch.full_like(w, cw))
    top = torch.where(ok, top, torch.full_like(top, (height - ch) // 2))
    left = torch.where(ok, left, torch.full_like(left, (width - cw) // 2))
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                  mode: str = "bicubic") -> torch.Tensor:
    """uint8 [N, C, H, W] -> crops (top, left, h, w) resampled to uint8 [N, C, size, size], flipped where `flip`."""
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # output pixel centres
    xs = left.view(-1, 1) + steps.view(1, -1) * w.view(-1, 1)  # [N, S] source x of each output column
    xs = torch.where(flip.view(-1, 1), xs.flip(1), xs)
    ys = top.view(-1, 1) + steps.view(1, -1) * h.view(-1, 1)
    gx = (xs / width * 2 - 1).view(n, 1, size).expand(n, size, size)  # grid_sample, align_corners=False
    gy = (ys / height * 2 - 1).view(n, size, 1).expand(n, size, size)
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class DeviceTrainLoader:
    """Infinite batches of a device-resident uint8 dataset, augmented on the device; exact resume from a cursor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, img_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", start_sample: int = 0, n_corrupt: int = 0,
                 sample_fn: Callable[[int], dict[str, torch.Tensor]] | None = None):
        if interpolation not in MODES:
            raise ValueError(f"interpolation must be one of {MODES}, got {interpolation!r}")
        if batch_size < 1 or not 0 <= rank < world_size or start_sample < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size and start_sample >= 0, got "
                             f"{batch_size}, {rank}, {world_size}, {start_sample}")
        self.images, self.labels = images, labels.to(images.device)
        self.num_samples = int(images.shape[0])
        self.batch_size, self.img_size = batch_size, img_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.scale, self.ratio, self.hflip, self.mode = tuple(scale), tuple(ratio), hflip, interpolation
        self.cursor = start_sample
        self.n_corrupt = n_corrupt
        self.sample_fn = sample_fn
        self._epochs: dict[int, dict[str, torch.Tensor]] = {}

    def epoch_tables(self, epoch: int) -> dict[str, torch.Tensor]:
        """An epoch's tables on the device: "order" [N] (image indices), and per image index "boxes" [N, 4],
        "flips" [N] and the `sample_fn` outputs [N, ...] (the "extra:" entries)."""
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(mix_seed(self.seed, "device-perm", epoch))
            order = torch.randperm(self.num_samples, generator=g).to(self.images.device)
            dev = self.images.device
            gc = torch.Generator(device=dev).manual_seed(mix_seed(self.seed, "device-crop", epoch))
            boxes = crop_boxes(self.num_samples, self.images.shape[2], self.images.shape[3], self.scale, self.ratio,
                               gc, dev)
            flips = torch.rand(self.num_samples, generator=gc, device=dev) < self.hflip
            tables = {"order": order, "boxes": boxes, "flips": flips}
            if self.sample_fn is not None:  # per image, on the host, once per epoch: one copy to the device
                rows = [self.sample_fn(mix_seed(self.seed, "sample", epoch, i)) for i in range(self.num_samples)]
                tables.update({f"extra:{k}": torch.stack([r[k] for r in rows]).to(dev) for k in rows[0]})
            for old in [e for e in self._epochs if e < epoch - 1]:  # a batch may straddle two epochs
                del self._epochs[old]
            self._epochs[epoch] = tables
        return self._epochs[epoch]

    def at(self, start: int, count: int) -> dict:
        """The batch of global positions [start, start + count): a pure function of them and the seed."""
        n, parts = self.num_samples, []
        p = start
        while p < start + count:  # contiguous slices of at most two epochs' orders: no host-device sync
            epoch, t = divmod(p, n)
            take = min(start + count - p, n - t)
            tables = self.epoch_tables(epoch)
            idx = tables["order"][t:t + take]
            parts.append({k: v.index_select(0, idx) for k, v in tables.items() if k != "order"} | {"idx": idx})
            p += take
        rows = {k: torch.cat([part[k] for part in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        src = self.images.index_select(0, rows["idx"])
        out = {"image": resized_crops(src, rows["boxes"], rows["flips"], self.img_size, self.mode),
               "label": self.labels.index_select(0, rows["idx"]), "n_corrupt": self.n_corrupt,
               "position": torch.arange(start, start + count, dtype=torch.int64, device=self.images.device)}
        out.update({k.removeprefix("extra:"): v for k, v in rows.items() if k.startswith("extra:")})
        return out

    def __iter__(self) -> Iterator[dict]:
        while True:
            out = self.at(self.cursor + self.rank * self.batch_size, self.batch_size)
            self.cursor += self.batch_size * self.world_size
            yield out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "order": ORDER_VERSION, "seed": self.seed, "num_samples": self.num_samples,
                "world_size": self.world_size, "batch_size": self.batch_size, "rank": self.rank, "loader": "device"}

    def load_state_dict(self, state: dict) -> None:
        """As `data.train_stream.TrainLoader.load_state_dict`: the cursor (or the entry points' `batches`, micro-batches
        per rank of this loader's size) at any world size or micro-batch; a different seed, dataset or order (a
        checkpoint of the shard stream) is refused."""
        mine = self.state_dict()
        if "order" not in state:
            log.warning("the loader state comes from the earlier per-rank device order: continuing at the same "
                        "number of samples, not with the same samples")
        fields = ("order", "seed", "num_samples") if "order" in state else ("seed", "num_samples")
        diff = [f"{k}: saved {state[k]} vs now {mine[k]}" for k in fields if k in state and state[k] != mine[k]]
        if diff:
            raise ValueError("cannot resume the device loader exactly, its order is defined differently: "
                             + "; ".join(diff))
        if "batches" in state:
            self.cursor = int(state["batches"]) * self.world_size * self.batch_size
        elif "cursor" in state:
            self.cursor = int(state["cursor"])
        else:
            raise ValueError(f"loader state has no cursor (keys: {sorted(state)})")


def build_device_loader(spec, *, batch_size: int, img_size: int, device, seed: int = 0, rank: int = 0,
                        world_size: int = 1, scale=(0.2, 1.0), hflip: float = 0.5, interpolation: str = "bicubic",
                        start_sample: int = 0, max_gb: float = 4.0,
                        sample_fn: Callable[[int], dict[str, torch.Tensor]] | None = None) -> DeviceTrainLoader:
    """Decode the split once, put it on `device` as uint8 and return its augmenting loader (see the module doc).
    `max_gb`: refuse splits larger than this many GiB as uint8 (they belong to the shard stream), before decoding
    them (`load_split_uint8`). `sample_fn(seed)`: per-image extras, as the shard stream's (seed mix_seed(seed,
    "sample", epoch, image index)), made once per epoch."""
    images, labels, skipped = load_split_uint8(spec, max_gb=max_gb)
    return DeviceTrainLoader(images.to(device), labels, batch_size=batch_size, img_size=img_size, seed=seed,
                             rank=rank, world_size=world_size, scale=scale, hflip=hflip, interpolation=interpolation,
                             start_sample=start_sample, n_corrupt=skipped, sample_fn=sample_fn)


__all__ = ["DeviceTrainLoader", "build_device_loader", "crop_boxes", "load_split_uint8", "resized_crops",
           "split_image_shape"]
