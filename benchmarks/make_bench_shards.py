"""Photo-like, ImageNet-sized JPEG shards for the loader and end-to-end benchmarks, from the shipped 32 px sample.

    python benchmarks/make_bench_shards.py --output SHARDS --images 16000 --shards 32 --workers 16 [--resize 256]

Each image is upscaled to a random --min-px..--max-px size with 1/f^0.8 noise (--texture grey levels) as photo-like
detail: JPEG decode cost grows with the entropy-coded bytes, and at the default the files average ~88 KB at 256-500
px, as real photos. Shards made with the same settings are reused.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import random
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data.info import resolve
from data.make_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "benchmarks" / "results" / "scratch"  # generated shards (benchmarks/results/ is git-ignored)
TEXTURE_SLOPE = 0.8  # amplitude spectrum ~ 1/f^0.8: between white noise (0) and natural images' ~1


def pink_noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] noise with amplitude spectrum 1/f^TEXTURE_SLOPE, unit standard deviation per channel."""
    f = np.sqrt(np.fft.rfftfreq(w)[None, :] ** 2 + np.fft.fftfreq(h)[:, None] ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f ** TEXTURE_SLOPE
    spec[:, 0, 0] = 0
    noise = np.fft.irfft2(spec, s=(h, w))
    return (noise / noise.std(axis=(1, 2), keepdims=True)).transpose(1, 2, 0)


def write_photo(job: tuple[bytes, int, int, str, float, int]) -> str:
    """The encoded image upscaled (bicubic) to w x h plus `texture` grey levels of pink noise, saved as JPEG."""
    data, w, h, path, texture, seed = job
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    if texture > 0:
        noise = pink_noise(h, w, np.random.default_rng(seed))
        mixed = np.asarray(img, dtype=np.float32) + texture * (0.6 * noise + 0.4 * noise.mean(axis=2, keepdims=True))
        img = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    img.save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT / "data" / "sample") + ":train")
    p.add_argument("--output", required=True)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--shards", type=int, default=32, help="enough for every (rank, worker) slot to have its own")
    p.add_argument("--min-px", type=int, default=256)
    p.add_argument("--max-px", type=int, default=500)
    p.add_argument("--texture", type=float, default=42.0, help="std of the 1/f noise in grey levels (0: smooth)")
    p.add_argument("--resize", type=int, default=None, help="store with the shorter side resized to this")
    p.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.shards <= args.images or not 1 <= args.min_px <= args.max_px:
        raise SystemExit("need 1 <= --shards <= --images and 1 <= --min-px <= --max-px")
    out, settings = Path(args.output), {k: v for k, v in vars(args).items() if k not in ("output", "workers")}
    meta = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").is_file() else {}
    if meta.get("bench") == settings:
        print(f"{out} already holds these {args.images} images; reusing it", flush=True)
        return meta["splits"]["train"]
    info = resolve(args.source)
    sample = [(s["jpg"], int(s["cls"])) for s in wds.DataPipeline(wds.SimpleShardList(info.urls),
                                                                   wds.tarfile_to_samples())]
    rng, tmp = random.Random(args.seed), out.parent / f".{out.name}-src"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jobs = [(sample[i % len(sample)][0], rng.randint(args.min_px, args.max_px), rng.randint(args.min_px, args.max_px),
             str(tmp / f"{i:07d}.jpg"), args.texture, args.seed * 1_000_003 + i) for i in range(args.images)]
    with multiprocessing.Pool(args.workers) as pool:
        paths = pool.map(write_photo, jobs, chunksize=64)
    entry = write_shards([(path, sample[i % len(sample)][1]) for i, path in enumerate(paths)], out, split="train",
                         shard_size=-(-args.images // args.shards), workers=args.workers, overwrite=True,
                         class_names=info.class_names, progress=True, resize=args.resize)
    shutil.rmtree(tmp)
    meta = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**meta, "bench": settings}, indent=1) + "\n")  # for the reuse check
    return entry


if __name__ == "__main__":
    main()
