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
                          "shuffled": true, "seed": 0, "resize": null}}}

Writing a second split into the same folder adds it to dataset.json; rewriting an existing split, or writing into
a folder that holds anything other than a Tessera dataset, needs `--overwrite`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

FORMAT = "tessera-wds/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif"}
# Suffixes stored as they are; anything else (bmp, tiff, ...) is re-encoded losslessly as png.
STORED_AS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FIXED_MTIME = 0.0  # tar member timestamps, so the same input gives the same tar members


class ShardWriteError(RuntimeError):
    """Bad input or output location for the shard writer (the message names the path)."""


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
    return {"index": index, "path": path, "label": label, "ext": ext, "data": raw, "size": (width, height)}


def _validated(jobs: list, workers: int) -> Iterable[dict]:
    if workers <= 1:
        yield from map(_read_and_check, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_read_and_check, jobs, chunksize=32)


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
    t0 = time.perf_counter()

    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    jobs = [(i, items[i][0], items[i][1], resize) for i in order]  # key = index in the sorted listing
    labelled = any(lab >= 0 for _, lab in items)

    ext = ".tar.gz" if compress else ".tar"
    tmp = out / f".tmp-{split}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards: list[dict] = []
    skipped: list[dict] = []
    image_keys: dict[str, int] = {}
    try:
        first: dict | None = None  # the writer opens a shard on creation: start it at the first valid image
        writer = None

        gz_files: dict[str, gzip.GzipFile] = {}

        def open_gz(fname: str) -> gzip.GzipFile:  # gzip with a fixed header time: same input, same bytes
            gz_files[fname] = gzip.GzipFile(fname, "wb", compresslevel=9, mtime=0)
            return gz_files[fname]

        def record(fname: str) -> None:  # called by ShardWriter when a shard is closed
            if fname in gz_files:  # TarWriter leaves a file object it did not open to its owner
                gz_files.pop(fname).close()
            shards.append({"name": Path(fname).name, "num_samples": writer.count, "bytes": os.path.getsize(fname)})

        bar = tqdm(_validated(jobs, workers), total=len(jobs), desc=f"shards {split}", unit="img", disable=not progress)
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
    }
    meta.setdefault("splits", {})[split] = entry
    meta["format"] = FORMAT
    tmp_meta = out / ".dataset.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, out / "dataset.json")
    return {**entry, "seconds": seconds, "images_per_sec": (entry["num_samples"] + len(skipped)) / max(seconds, 1e-9)}


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
        raise SystemExit(f"make_shards: error: {exc}") from None
    print(_summary(args.split, Path(args.output), res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
