"""Write an image collection (ImageFolder tree, flat folder or list file) as WebDataset shards + dataset.json.

    python data/make_shards.py --input /data/imagenet/train --output /data/in1k-wds --split train --workers 8

Each sample is `{__key__, jpg|png|webp (the original file bytes, re-encoded only with --resize), cls}`; `cls` is
left out for unlabelled input. Every image is validated (PIL `verify()` and a full decode) in a process pool before
anything is written; unreadable or corrupt files are skipped and listed in the summary and in dataset.json.
Shards are first written to a hidden temporary folder and moved into place only when the split is complete,
so an interrupted run never leaves a partial set behind.

`OUT/dataset.json` describes every split written into OUT (one file, several splits):

    {"format": "tessera-wds/1",
     "splits": {"train": {"num_samples": 3200, "num_shards": 4, "num_classes": 10, "class_names": [...],
                          "shards": [{"name": "train-000000.tar.gz", "num_samples": 800, "bytes": 1048576}, ...],
                          "skipped": [{"path": "...", "reason": "..."}], "image_keys": {"jpg": 3200},
                          "shuffled": true, "seed": 0, "resize": null, "image_size": [32, 32], ...}}}

`image_size` is [height, width] when every stored image has that size, else null (the device loader estimates the
split's memory from it before decoding anything).

Writing a second split into the same folder adds it to dataset.json; rewriting an existing split, or writing into
a folder that holds anything other than a Tessera dataset, needs `--overwrite`.

The temporary folder is `OUT/.tmp-<split>-<pid>/` (with `.owner.json`: host, pid, process start time). It is removed
when the writer fails, is interrupted (Ctrl-C) or gets SIGTERM/SIGHUP (exit code 128 + signal); one left by a writer
that was killed outright (SIGKILL, power loss) is removed by the next writer into OUT once its process is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil
import webdataset as wds
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):  # `python data/make_shards.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.errors import UserError  # noqa: E402
from data.worker_signals import ignore_stop_signals  # noqa: E402

FORMAT = "tessera-wds/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif", ".npy"}
# Suffixes stored as they are; anything else (bmp, tiff, ...) is re-encoded losslessly as png.
STORED_AS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FIXED_MTIME = 0.0  # tar member timestamps, so the same input gives the same tar members
PROG = "data/make_shards.py"


OWNER_FILE = ".owner.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
log = logging.getLogger(__name__)


class ShardWriteError(UserError, RuntimeError):
    """Bad input or output location for the shard writer (the message names the path)."""


class WriteInterrupted(BaseException):
    """The writer got SIGTERM/SIGHUP; its temporary folder has been removed. `signum` says which. A BaseException,
    like KeyboardInterrupt, so that the per-image `except Exception` does not take it for a bad image."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _raise_on_stop_signals():
    """Turn SIGTERM/SIGHUP into WriteInterrupted in the main thread, so `finally` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise WriteInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _pool_worker_init() -> None:
    """Pool workers survive SIGTERM/SIGHUP sent to the whole process group (`timeout`, SLURM, a closed terminal):
    only the parent handles them, then ends its pool (`Pool.terminate`, SIGTERM from the parent, which still ends a
    worker). A worker killed by a group signal could die holding the pool's queue lock and hang that terminate."""
    ignore_stop_signals()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # (SIGTERM stays blocked: see ignore_stop_signals)


def _owner() -> dict:
    try:
        created = psutil.Process().create_time()
    except psutil.Error:
        created = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "create_time": created}


def _writer_alive(tmp: Path) -> bool:
    """Is the writer that owns temporary folder `tmp` still running? Unknown (another host) counts as alive."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = {"host": socket.gethostname(), "pid": tmp.name.rsplit("-", 1)[-1], "create_time": None}
    if owner.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(owner["pid"]))
        created = owner.get("create_time")
        return created is None or abs(proc.create_time() - created) < 1.0
    except (psutil.NoSuchProcess, ValueError, TypeError, KeyError):
        return False
    except psutil.Error:
        return True


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove `.tmp-<split>-<pid>` folders in `out` left by writers that are no longer running; return them."""
    removed = []
    for tmp in out.glob(".tmp-*-*"):
        if tmp.is_dir() and not _writer_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            log.warning("removed %s, left by a shard writer that is no longer running", tmp)
    return removed


# ----------------------------------------------------------------------------------------------- listing inputs
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(source: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str] | None]:
    """List `(path, label)` items of an ImageFolder tree, a flat folder or a text file of paths.

    ImageFolder: labels are indices into the sorted sub-folder names (as torchvision's ImageFolder).
    A flat folder or a list file (one path per line, relative paths taken from the list's folder) is unlabelled:
    label -1 and class names None.
    """
    src = Path(source)
    if not src.exists():
        raise ShardWriteError(f"input not found: {src}")
    if src.is_file():
        items = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            items.append((str(p if p.is_absolute() else src.parent / p), -1))
        if not items:
            raise ShardWriteError(f"image list is empty: {src}")
        return items, None
    subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        class_names = [d.name for d in subdirs]
        items = [
            (str(f), label)
            for label, d in enumerate(subdirs)
            for f in sorted(d.rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        ]
        if not items:
            raise ShardWriteError(f"no images found under the class folders of {src}")
        return items, class_names
    items = [(str(f), -1) for f in sorted(src.iterdir()) if _is_image(f)]
    if not items:
        raise ShardWriteError(f"no images found in {src} (looked for {sorted(IMAGE_SUFFIXES)})")
    return items, None


# --------------------------------------------------------------------------------------------- validating images
def _read_and_check(job: tuple[int, str, int, int | None]) -> dict:
    """Read one file and validate it; runs in a pool worker. Returns the bytes to store or the reason to skip."""
    index, path, label, resize = job
    try:
        kept = _read_kept_depth(index, path, label, resize)  # .npy, 16-bit and float images keep their pixels
        if kept is not None:
            return _with_stats(kept)
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()  # structure check (cheap), catches most broken headers/chunks
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # full decode: catches truncated data that verify() lets through
            width, height = img.size
            if width < 1 or height < 1:
                raise ValueError(f"empty image {width}x{height}")
            suffix = Path(path).suffix.lower()
            ext = STORED_AS.get(suffix)
            if resize and min(width, height) > resize:
                scale = resize / min(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                out = img.convert("RGB") if img.mode not in ("RGB", "L") else img
                out = out.resize(size, Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                if ext == "png":
                    out.save(buf, format="PNG")
                else:
                    ext = "jpg"
                    out.save(buf, format="JPEG", quality=90)
                raw, (width, height) = buf.getvalue(), size
            elif ext is None:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                raw, ext = buf.getvalue(), "png"
    except Exception as exc:  # any decoder error means: skip this file and report it
        return {"index": index, "path": path, "error": f"{type(exc).__name__}: {exc}"}
    return _with_stats({"index": index, "path": path, "label": label, "ext": ext, "data": raw,
                        "size": (width, height)})


def _validated(jobs: list, workers: int) -> Iterable[dict]:
    if workers <= 1:
        yield from map(_read_and_check, jobs)
        return
    # the stop signals stay blocked while the workers are forked, until their initializer has set them up: one that
    # arrives in between waits (then reaches the parent, or is ignored by a worker) instead of killing a worker
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_pool_worker_init)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    with pool:
        yield from pool.imap(_read_and_check, jobs, chunksize=32)


# ------------------------------------------------------------------ bit depth, channel count, per-channel statistics
# 16-bit and float images and `.npy` arrays keep their pixels: PNG as it is (16-bit grayscale TIFF re-encoded as
# 16-bit PNG), everything else, and anything resized, as an `.npy` [H, W, C] array. data/decode.py reads them back.
def _array_bytes(pixels) -> bytes:
    """A [C, H, W] tensor as `.npy` bytes of an [H, W, C] array (its dtype kept)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), allow_pickle=False)
    return buf.getvalue()


def _resized(pixels, resize: int):
    """A [C, H, W] tensor with its shorter side scaled down to `resize` (antialiased bicubic), dtype kept."""
    import torch

    h, w = pixels.shape[-2:]
    scale = resize / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = torch.nn.functional.interpolate(pixels[None].double(), size=size, mode="bicubic", antialias=True)[0]
    if pixels.dtype.is_floating_point:
        return out.to(pixels.dtype)
    top = float(torch.iinfo(pixels.dtype).max)
    return out.round().clamp(0, top).to(torch.int32).to(pixels.dtype)


def _read_kept_depth(index: int, path: str, label: int, resize: int | None) -> dict | None:
    """The stored sample of an `.npy` array or of a 16-bit or float image (decoded as data/decode.py will), or
    None for an 8-bit image (the PIL path of `_read_and_check`). Raises on unreadable data."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jpg", ".jpeg", ".webp", ".gif"):  # 8 bits per channel as PIL reads them
        return None
    from data.decode import HIGH_DEPTH_MODES, array_pixels, decode_image, png_bit_depth

    with open(path, "rb") as f:
        raw = f.read()
    if suffix == ".npy":
        pixels, ext = array_pixels(raw), "npy"
    elif png_bit_depth(raw) == 16:
        pixels, ext = decode_image({"png": raw}), "png"
    else:
        with Image.open(io.BytesIO(raw)) as img:
            if img.mode not in HIGH_DEPTH_MODES:
                return None
            img.load()
            ext = "png" if img.mode.startswith("I;16") else "npy"
            if ext == "png" and suffix != ".png":  # a 16-bit grayscale TIFF: the same pixels as a 16-bit PNG
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                raw = buf.getvalue()
        pixels = decode_image({"png" if ext == "png" else "tif": raw})
    if resize and min(pixels.shape[-2:]) > resize:
        pixels, ext = _resized(pixels, resize), "npy"
    if ext == "npy":
        raw = _array_bytes(pixels)
    height, width = pixels.shape[-2:]
    return {"index": index, "path": path, "label": label, "ext": ext, "data": raw, "size": (width, height)}


def _with_stats(res: dict) -> dict:
    """The result with `stats`: [channels, dtype, per-channel sum, sum of squares, pixels] of the stored image as the
    loaders decode it, in [0, 1] (divided by the dtype's maximum). An 8-bit grayscale image counts as 1 channel.
    No full-size copy of the image is made: 8-bit sums come exactly from PIL's per-band histogram, others from row
    chunks (`_tensor_sums`)."""
    if "error" in res:
        return res
    from data.decode import decode_image

    pixels = decode_image({res["ext"]: res["data"], "__key__": res["path"]})
    if isinstance(pixels, Image.Image):
        with Image.open(io.BytesIO(res["data"])) as head:
            gray = head.mode in ("1", "L", "LA")
        sums, squares, n = _histogram_sums(pixels, 1 if gray else 3)
        dtype = "uint8"
    else:
        sums, squares, n = _tensor_sums(pixels)
        dtype = str(pixels.dtype).removeprefix("torch.")
    res["stats"] = [len(sums), dtype, sums, squares, n]
    return res


def _histogram_sums(img: Image.Image, channels: int) -> tuple[list[float], list[float], int]:
    """Per-channel sum and sum of squares of an RGB image's first `channels` bands in [0, 1] units, from PIL's
    256-bin histogram of each band: exact integer sums, one division each, no pixel copy."""
    hist = img.histogram()  # 256 counts per band, bands in order (decodes the image if it is not loaded yet)
    sums, squares = [], []
    for c in range(channels):
        counts = hist[256 * c:256 * (c + 1)]
        sums.append(sum(v * k for v, k in enumerate(counts)) / 255)
        squares.append(sum(v * v * k for v, k in enumerate(counts)) / 255**2)
    return sums, squares, sum(hist[:256])


STATS_CHUNK = 1 << 22  # values per channel in one row chunk of `_tensor_sums` (32 MiB as int64/float64)


def _tensor_sums(pixels) -> tuple[list[float], list[float], int]:
    """Per-channel sum and sum of squares of a [C, H, W] tensor in [0, 1] units (divided by the dtype's maximum),
    in row chunks of at most STATS_CHUNK values per channel: integer pixels exactly (int64 within a chunk, Python
    integers across chunks), floats in float64."""
    import torch

    channels, height, width = pixels.shape
    rows = max(1, STATS_CHUNK // max(width, 1))
    exact = not pixels.dtype.is_floating_point
    sums, squares = [0] * channels, [0] * channels
    for top in range(0, height, rows):
        chunk = pixels[:, top:top + rows].to(torch.int64 if exact else torch.float64)
        sums = [a + b for a, b in zip(sums, chunk.sum(dim=(1, 2)).tolist())]
        squares = [a + b for a, b in zip(squares, chunk.mul_(chunk).sum(dim=(1, 2)).tolist())]
    scale = float(torch.iinfo(pixels.dtype).max) if exact else 1.0
    return [s / scale for s in sums], [q / scale**2 for q in squares], height * width


def _add_stats(acc: dict, stats: list) -> None:
    """Accumulate one image's statistics by channel count (float64 sums)."""
    channels, dtype, sums, squares, n = stats
    a = acc.setdefault(channels, {"sum": [0.0] * channels, "sq": [0.0] * channels, "n": 0, "dtypes": set()})
    a["sum"] = [x + y for x, y in zip(a["sum"], sums)]
    a["sq"] = [x + y for x, y in zip(a["sq"], squares)]
    a["n"] += n
    a["dtypes"].add(dtype)


def _channel_stats(acc: dict) -> dict:
    """dataset.json's `channels`, `dtype`, `mean` and `std` (population, per channel, over every pixel). 1-channel
    images in a C-channel split count in every channel (the loaders repeat them, as PIL's grayscale -> RGB);
    other mixtures of channel counts record `channels: null` and no statistics."""
    if not acc:
        return {}
    top = max(acc)
    dtypes = set().union(*(a["dtypes"] for a in acc.values()))
    dtype = next(d for d in ("float32", "uint16", "uint8") if d in dtypes)
    if set(acc) - {1, top}:
        return {"channels": None, "dtype": dtype}
    sums, squares, n = [0.0] * top, [0.0] * top, 0
    for channels, a in acc.items():
        for c in range(top):  # channels is 1 (repeated: c % 1 == 0) or top (c % top == c)
            sums[c] += a["sum"][c % channels]
            squares[c] += a["sq"][c % channels]
        n += a["n"]
    mean = [s / n for s in sums]
    std = [max(q / n - m * m, 0.0) ** 0.5 for q, m in zip(squares, mean)]
    return {"channels": top, "dtype": dtype, "mean": [round(m, 6) for m in mean], "std": [round(s, 6) for s in std]}


# ------------------------------------------------------------------------------------------------ output folder
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardWriteError(f"cannot read {path}: {exc}") from exc


def _prepare_output(out: Path, split: str, overwrite: bool) -> dict:
    """Check the output folder; return the existing dataset.json content (or a fresh one)."""
    if out.exists() and not out.is_dir():
        raise ShardWriteError(f"output is a file, not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "dataset.json"
    meta = _read_json(meta_path) if meta_path.exists() else {"format": FORMAT, "splits": {}}
    ours = {f"{split}-"}
    existing = [p for p in out.iterdir() if not p.name.startswith(".")]
    if meta_path.exists():
        known = {s["name"] for sp in meta.get("splits", {}).values() for s in sp.get("shards", [])}
        foreign = [p.name for p in existing if p.name != "dataset.json" and p.name not in known]
        clash = split in meta.get("splits", {}) or any(p.name.startswith(tuple(ours)) for p in existing)
    else:
        foreign, clash = [p.name for p in existing], False
    if (foreign or clash) and not overwrite:
        what = f"split '{split}' already exists" if clash else f"it holds other files ({', '.join(foreign[:3])})"
        raise ShardWriteError(f"output folder {out} is not empty: {what}; pass --overwrite to replace")
    return meta


def write_shards(
    input: str | os.PathLike | Sequence[tuple[str, int]],
    output: str | os.PathLike,
    *,
    split: str = "train",
    shard_size: int = 10000,
    max_shard_bytes: float = 1e9,
    shuffle: bool = True,
    seed: int = 0,
    workers: int = 1,
    resize: int | None = None,
    compress: bool = False,
    overwrite: bool = False,
    class_names: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Write `input` as `output/<split>-NNNNNN.tar[.gz]` shards and record the split in `output/dataset.json`.

    `input` is an ImageFolder tree, a flat folder, a text file of image paths, or a list of `(path, label)`
    (label -1: unlabelled) with `class_names`. Returns the split's dataset.json entry plus `images_per_sec`.
    """
    if shard_size < 1 or max_shard_bytes <= 0:
        raise ShardWriteError(f"shard_size and max_shard_bytes must be positive (got {shard_size}, {max_shard_bytes})")
    if not split or any(c in split for c in "/:.{} "):
        raise ShardWriteError(f"split name must be a plain word, got {split!r}")
    if isinstance(input, (str, os.PathLike)):
        items, class_names = list_images(input)
    else:
        items = [(str(p), int(lab)) for p, lab in input]
        if not items:
            raise ShardWriteError("no images given")
    out = Path(output)
    meta = _prepare_output(out, split, overwrite)
    clean_stale_tmp(out)
    with _raise_on_stop_signals():
        try:
            return _write(items, class_names, out, meta, split=split, shard_size=shard_size,
                          max_shard_bytes=max_shard_bytes, shuffle=shuffle, seed=seed, workers=workers,
                          resize=resize, compress=compress, progress=progress)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            # _write has removed its temporary folder by now: the free space is what the user has to work with
            raise ShardWriteError(f"the disk is full writing split '{split}' into {out} ({os.strerror(exc.errno)}); "
                                  f"{_free_space(out)} free there now. The partial shards were removed; free space "
                                  f"or choose another --output, then run the command again") from None


def _write(items, class_names, out: Path, meta: dict, *, split, shard_size, max_shard_bytes, shuffle, seed, workers,
           resize, compress, progress) -> dict:
    t0 = time.perf_counter()

    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    jobs = [(i, items[i][0], items[i][1], resize) for i in order]  # key = index in the sorted listing
    labelled = any(lab >= 0 for _, lab in items)

    ext = ".tar.gz" if compress else ".tar"
    tmp = out / f".tmp-{split}-{os.getpid()}"
    shards: list[dict] = []
    skipped: list[dict] = []
    image_keys: dict[str, int] = {}
    pixel_stats: dict[int, dict] = {}
    sizes: set[tuple[int, int]] = set()  # stored (width, height)
    writer = None  # the writer opens a shard on creation: start it at the first valid image
    results = _validated(jobs, workers)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / OWNER_FILE).write_text(json.dumps(_owner()))

        gz_files: dict[str, gzip.GzipFile] = {}

        def open_gz(fname: str) -> gzip.GzipFile:  # gzip with a fixed header time: same input, same bytes
            gz_files[fname] = gzip.GzipFile(fname, "wb", compresslevel=9, mtime=0)
            return gz_files[fname]

        def record(fname: str) -> None:  # called by ShardWriter when a shard is closed
            if fname in gz_files:  # TarWriter leaves a file object it did not open to its owner
                gz_files.pop(fname).close()
            shards.append({"name": Path(fname).name, "num_samples": writer.count, "bytes": os.path.getsize(fname)})

        bar = tqdm(results, total=len(jobs), desc=f"shards {split}", unit="img", disable=not progress)
        for res in bar:
            if "error" in res:
                skipped.append({"path": res["path"], "reason": res["error"]})
                bar.set_postfix(skipped=len(skipped))
                continue
            if writer is None:
                pattern = str(tmp / f"{split}-%06d{ext}")
                writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=max_shard_bytes, post=record,
                                         opener=open_gz if compress else None, verbose=0, encoder=False,
                                         compress=False, mtime=FIXED_MTIME)
            sample = {"__key__": f"{res['index']:08d}", res["ext"]: res["data"]}
            if labelled:
                sample["cls"] = str(res["label"]).encode()
            writer.write(sample)
            image_keys[res["ext"]] = image_keys.get(res["ext"], 0) + 1
            _add_stats(pixel_stats, res["stats"])
            sizes.add(tuple(res["size"]))
        bar.close()
        if writer is None:
            raise ShardWriteError(f"no valid image in the input ({len(skipped)} skipped: {skipped[:3]})")
        writer.close()
        # all shards complete: move them into place (atomic per file), then drop old shards of this split
        for s in shards:
            os.replace(tmp / s["name"], out / s["name"])
        new_names = {s["name"] for s in shards}
        for old in out.glob(f"{split}-*.tar*"):
            if old.name not in new_names:
                old.unlink()
    finally:
        results.close()  # ends the worker pool now, while its helper threads still run (not at interpreter exit)
        if getattr(writer, "tarstream", None) is not None:  # interrupted mid-shard: close before removing
            with contextlib.suppress(Exception):
                writer.tarstream.close()
                writer.tarstream = None
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0

    entry = {
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "num_classes": len(class_names) if class_names else 0,
        "class_names": class_names,
        "labelled": labelled,
        "shards": shards,
        "skipped": skipped,
        "image_keys": image_keys,
        "shuffled": shuffle,
        "seed": seed,
        "resize": resize,
        "image_size": [one[1], one[0]] if (one := _only(sizes)) else None,  # [height, width]: all alike, else None
        **_channel_stats(pixel_stats),  # channels, dtype, per-channel mean and std: the runs' default normalisation
    }
    meta.setdefault("splits", {})[split] = entry
    meta["format"] = FORMAT
    tmp_meta = out / ".dataset.json.tmp"
    try:
        tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp_meta, out / "dataset.json")
    except BaseException:
        tmp_meta.unlink(missing_ok=True)
        raise
    return {**entry, "seconds": seconds, "images_per_sec": (entry["num_samples"] + len(skipped)) / max(seconds, 1e-9)}


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _free_space(path: Path) -> str:
    """Free space on the file system holding `path`, for a message ("12.3 MiB"; "unknown" if it cannot be read)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def _only(values: set):
    """The one element of `values`, or None when it holds none or several."""
    return next(iter(values)) if len(values) == 1 else None


def _summary(split: str, out: Path, res: dict) -> str:
    lines = [
        f"split {split}: {res['num_samples']} images in {res['num_shards']} shards -> {out} "
        f"({res['seconds']:.1f} s, {res['images_per_sec']:.0f} images/s)",
        f"skipped {len(res['skipped'])} unreadable or corrupt files",
    ]
    lines += [f"  {s['path']}: {s['reason']}" for s in res["skipped"][:20]]
    if len(res["skipped"]) > 20:
        lines.append(f"  ... {len(res['skipped']) - 20} more listed in {out / 'dataset.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="ImageFolder tree, flat folder of images, or text file of paths")
    p.add_argument("--output", required=True, help="output folder (gets <split>-NNNNNN.tar and dataset.json)")
    p.add_argument("--split", default="train", help="split name, the shard file prefix (default: train)")
    p.add_argument("--shard-size", type=int, default=10000, help="max images per shard (default: 10000)")
    p.add_argument("--max-shard-bytes", type=float, default=1e9, help="max payload bytes per shard (default: 1e9)")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle the images across shards before writing (default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes reading and validating images (default: cores - 1)")
    p.add_argument("--resize", type=int, default=None, help="downscale so the shorter side is this (re-encodes)")
    p.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz); for tiny images only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split / non-empty folder")
    args = p.parse_args(argv)
    try:
        res = write_shards(args.input, args.output, split=args.split, shard_size=args.shard_size,
                           max_shard_bytes=args.max_shard_bytes, shuffle=args.shuffle, seed=args.seed,
                           workers=args.workers, resize=args.resize, compress=args.compress, overwrite=args.overwrite)
    except ShardWriteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except WriteInterrupted as exc:
        print(f"{PROG}: {exc}; the temporary shards were removed, nothing was written to {args.output}",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None
    print(_summary(args.split, Path(args.output), res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
