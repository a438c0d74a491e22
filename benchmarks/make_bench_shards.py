"""Write ImageNet-sized, photo-like JPEG shards for the loader and end-to-end benchmarks from the shipped 32 px
sample (no network needed).

    python benchmarks/make_bench_shards.py --output /tmp/bench-shards --images 16000 --shards 32 --workers 16
    python benchmarks/make_bench_shards.py --output /tmp/bench-256 --resize 256 ...   # pre-resized shards

Each image of data/sample's train split is upscaled (bicubic) to a random size between --min-px and --max-px per
side (ImageNet's typical 256-500 px range by default), given photo-like detail (--texture: 1/f^0.8 "pink" noise of
that standard deviation in grey levels, 60% per channel and 40% shared, seeded per image) and saved as JPEG quality
90, cycling over the sample until --images are written, then packed by data/make_shards.write_shards (--resize:
shorter side resized there, as `make_shards.py --resize`). Why texture: JPEG decode cost grows with the entropy-coded
bytes, and smooth upscaled images decode ~1.4x faster than photos of the same size. At the default 42 the files
average ~88 KB at 256-500 px, the size of real photos there (ImageNet: ~110 KB at ~400x350); --texture 0 gives the
smooth images of earlier runs.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import random
import shutil
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.info import resolve  # noqa: E402
from data.make_shards import write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_sample(spec: str) -> tuple[list[tuple[bytes, int]], list[str] | None]:
    """(jpeg bytes, label) of every image in the split's shards, and the class names."""
    info = resolve(spec)
    items = []
    for url in info.urls:
        with tarfile.open(url) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in sorted(files.items()):
            stem, ext = name.rsplit(".", 1)
            if ext in ("jpg", "jpeg", "png"):
                cls = files.get(f"{stem}.cls")
                items.append((data, int(cls.decode()) if cls is not None else -1))
    if not items:
        raise SystemExit(f"no images found in {spec}")
    return items, info.class_names


TEXTURE_SLOPE = 0.8  # amplitude spectrum ~ 1/f^0.8: between white noise (0) and natural images' ~1


def pink_noise(h: int, w: int, rng: np.random.Generator, slope: float = TEXTURE_SLOPE) -> np.ndarray:
    """[h, w, 3] noise with amplitude spectrum 1/f^slope, unit standard deviation per channel."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f ** slope
    spec[:, 0, 0] = 0
    noise = np.fft.irfft2(spec, s=(h, w))
    noise /= noise.std(axis=(1, 2), keepdims=True)
    return noise.transpose(1, 2, 0)


def photo_like(data: bytes, w: int, h: int, texture: float, seed: int) -> Image.Image:
    """The encoded image upscaled (bicubic) to w x h, plus `texture` grey levels of pink noise."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    if texture <= 0:
        return img
    noise = pink_noise(h, w, np.random.default_rng(seed))
    mixed = 0.6 * noise + 0.4 * noise.mean(axis=2, keepdims=True)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + texture * mixed, 0, 255).astype(np.uint8))


def _upscale(job: tuple[int, bytes, int, int, str, float, int]) -> str:
    index, data, w, h, path, texture, seed = job
    photo_like(data, w, h, texture, seed).save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT / "data" / "sample") + ":train")
    p.add_argument("--output", required=True)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--shards", type=int, default=32, help="enough for every (rank, worker) slot to have its own")
    p.add_argument("--min-px", type=int, default=256)
    p.add_argument("--max-px", type=int, default=500)
    p.add_argument("--texture", type=float, default=42.0,
                   help="photo-like detail: std of 1/f noise in grey levels (0: smooth upscales)")
    p.add_argument("--resize", type=int, default=None, help="store with the shorter side resized to this")
    p.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < args.shards or args.shards < 1:
        raise SystemExit(f"--images ({args.images}) must be >= --shards ({args.shards}) >= 1")
    if not 1 <= args.min_px <= args.max_px:
        raise SystemExit(f"need 1 <= --min-px <= --max-px, got {args.min_px}, {args.max_px}")
    out = Path(args.output)
    meta = out / "dataset.json"
    if meta.exists():
        split = json.loads(meta.read_text()).get("splits", {}).get("train", {})
        made = json.loads(meta.read_text()).get("bench", {})
        if split.get("num_samples") == args.images and made == _recipe(args):
            print(f"{out} already holds {args.images} images; reusing it", flush=True)
            return split
    items, class_names = read_sample(args.source)
    rng = random.Random(args.seed)
    tmp = out.parent / f".{out.name}-src"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jobs = []
    for i in range(args.images):
        data, label = items[i % len(items)]
        w, h = rng.randint(args.min_px, args.max_px), rng.randint(args.min_px, args.max_px)
        jobs.append((i, data, w, h, str(tmp / f"{i:07d}.jpg"), args.texture, args.seed * 1_000_003 + i))
    labels = [items[i % len(items)][1] for i in range(args.images)]
    with multiprocessing.Pool(args.workers) as pool:
        paths = list(tqdm(pool.imap(_upscale, jobs, chunksize=64), total=len(jobs), desc="upscale"))
    if class_names is None:
        class_names = [str(c) for c in sorted({lab for lab in labels if lab >= 0})]
    entry = write_shards(list(zip(paths, labels)), out, split="train", shard_size=-(-args.images // args.shards),
                         workers=args.workers, class_names=class_names, overwrite=True, progress=True,
                         resize=args.resize)
    shutil.rmtree(tmp)
    full = json.loads(meta.read_text())
    meta.write_text(json.dumps({**full, "bench": _recipe(args)}, indent=1) + "\n")  # what the reuse check compares
    return entry


def _recipe(args) -> dict:
    return {"min_px": args.min_px, "max_px": args.max_px, "texture": args.texture, "resize": args.resize,
            "seed": args.seed, "source": args.source}


if __name__ == "__main__":
    main()
