"""Write ImageNet-sized JPEG shards for the end-to-end benchmark from the shipped 32 px sample (no network needed).

    python benchmarks/make_bench_shards.py --output /tmp/bench-shards --images 16000 --shards 32 --workers 16

Each image of data/sample's train split is upscaled (bicubic) to a random size between --min-px and --max-px per
side (ImageNet's typical 300-500 px range by default) and saved as JPEG quality 90, cycling over the sample until
--images are written, then packed by data/make_shards.write_shards. The pixels carry no more detail than the 32 px
originals, but decode, crop and resize cost depend on the stored size, which is what the loader benchmark needs.
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


def _upscale(job: tuple[int, bytes, int, int, str]) -> str:
    index, data, w, h, path = job
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT / "data" / "sample") + ":train")
    p.add_argument("--output", required=True)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--shards", type=int, default=32, help="enough for every (rank, worker) slot to have its own")
    p.add_argument("--min-px", type=int, default=300)
    p.add_argument("--max-px", type=int, default=500)
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
        if split.get("num_samples") == args.images:
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
        jobs.append((i, data, w, h, str(tmp / f"{i:07d}.jpg")))
    labels = [items[i % len(items)][1] for i in range(args.images)]
    with multiprocessing.Pool(args.workers) as pool:
        paths = list(tqdm(pool.imap(_upscale, jobs, chunksize=64), total=len(jobs), desc="upscale"))
    if class_names is None:
        class_names = [str(c) for c in sorted({lab for lab in labels if lab >= 0})]
    entry = write_shards(list(zip(paths, labels)), out, split="train", shard_size=-(-args.images // args.shards),
                         workers=args.workers, class_names=class_names, overwrite=True, progress=True)
    shutil.rmtree(tmp)
    return entry


if __name__ == "__main__":
    main()
