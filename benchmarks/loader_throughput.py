"""Measure the data pipeline: training-loader images/s (decode + augment) and shard-writer images/s.

    python benchmarks/loader_throughput.py --out benchmarks/results/loader.json

Cases: 32 px JPEGs (the shipped sample, data/sample) and 224-500 px JPEGs (CIFAR-10 upscaled, written to /tmp),
pretraining augmentation, in-process (CPU time per image, robust to other load) and with 1 and 2 DataLoader
workers, with and without PIL draft (reduced-size JPEG decode); plus decode alone, with and without draft.
Each case times `--batches` batches after `--warmup` batches (worker start-up excluded). Writer: CIFAR-10 train
(50,000 JPEGs) from an unpacked ImageFolder into /tmp. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from data.make_shards import write_shards  # noqa: E402
from data.train_stream import build_train_loader  # noqa: E402
from data.transforms import CIFAR10_MEAN, CIFAR10_STD, pretrain_transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = "/work/shared/datasets/cifar10-jpg.tar.gz"


def make_large_jpegs(out: Path, n: int, archive: str, seed: int = 0) -> Path:
    """n CIFAR-10 images upscaled (bicubic) to random sizes of 224-500 px per side, JPEG quality 90, as shards."""
    if (out / "dataset.json").exists():
        return out
    rng = random.Random(seed)
    src = out.parent / (out.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        k = 0
        for m in tar:
            if not m.name.endswith(".jpg") or "/train/" not in f"/{m.name}":
                continue
            img = Image.open(tar.extractfile(m)).convert("RGB")
            size = (rng.randint(224, 500), rng.randint(224, 500))
            img.resize(size, Image.Resampling.BICUBIC).save(src / f"{k:05d}.jpg", quality=90)
            k += 1
            if k == n:
                break
    write_shards(src, out, split="train", shard_size=max(1, n // 8), workers=1, progress=False)
    shutil.rmtree(src)
    return out


def time_loader(spec, img_size, mean, std, num_workers, decode_size, batch_size, warmup, batches) -> dict:
    loader = build_train_loader(spec, batch_size=batch_size, transform=pretrain_transform(img_size, mean, std),
                                seed=0, num_workers=num_workers, shuffle_buffer=256, decode_size=decode_size)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    total = batches * batch_size / dt
    out = {"images_per_sec": total, "per_worker": total / max(1, num_workers), "seconds": dt}
    if num_workers == 0:  # all work in this process: CPU time per image, robust to other load on the machine
        out["cpu_ms_per_image"] = 1000 * cpu / (batches * batch_size)
    return out


def time_decode(spec: str, draft: int | None, repeats: int = 3) -> dict:
    """CPU time to decode every image of the split (no augmentation), in this process."""
    from data.decode import decode_image
    from data.info import resolve

    samples = list(wds.DataPipeline(wds.SimpleShardList(resolve(spec).urls), wds.tarfile_to_samples()))
    c0 = time.process_time()
    for _ in range(repeats):
        sizes = [decode_image(s, draft).size for s in samples]
    cpu = time.process_time() - c0
    mean_px = sum(w * h for w, h in sizes) / len(sizes)
    return {"cpu_ms_per_image": 1000 * cpu / (repeats * len(samples)), "mean_decoded_pixels": mean_px}


def time_writer(cifar_train: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = write_shards(cifar_train, out, split="train", shard_size=10000, workers=workers, progress=False)
    size = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return {"images": res["num_samples"], "seconds": res["seconds"], "images_per_sec": res["images_per_sec"],
            "bytes": size}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    p.add_argument("--scratch", default="/tmp/tessera-bench", help="folder for generated shards")
    p.add_argument("--cifar", default="/tmp/cifar10", help="unpacked CIFAR-10 ImageFolder (train/, test/)")
    p.add_argument("--archive", default=ARCHIVE)
    p.add_argument("--workers", default="0,1,2",
                   help="DataLoader worker counts to try (0: in-process, also gives CPU ms/img)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--large-images", type=int, default=400)
    p.add_argument("--skip-writer", action="store_true")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    workers = [int(w) for w in args.workers.split(",")]

    large = make_large_jpegs(scratch / "jpeg224-500", args.large_images, args.archive)
    cases = [("32px sample", str(ROOT / "data" / "sample"), 32, CIFAR10_MEAN, CIFAR10_STD, None),
             ("224-500px, full decode", str(large), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None),
             ("224-500px, draft>=224", str(large), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
             ("224-500px, draft>=112", str(large), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 112)]
    results = {"loader": [], "writer": []}
    print(f"{'case':28s} {'workers':>7s} {'img/s':>9s} {'img/s/worker':>13s} {'CPU ms/img':>11s}")
    for (name, spec, size, mean, std, draft), nw in itertools.product(cases, workers):
        r = time_loader(spec, size, mean, std, nw, draft, args.batch_size, args.warmup, args.batches)
        results["loader"].append({"case": name, "workers": nw, "img_size": size, "decode_size": draft, **r})
        cpu = f"{r['cpu_ms_per_image']:11.2f}" if "cpu_ms_per_image" in r else f"{'':11s}"
        print(f"{name:28s} {nw:7d} {r['images_per_sec']:9.0f} {r['per_worker']:13.0f} {cpu}", flush=True)

    for draft in (None, 224, 112):
        r = time_decode(str(large), draft)
        results.setdefault("decode", []).append({"case": "224-500px decode only", "decode_size": draft, **r})
        print(f"decode only 224-500px, draft {draft}: {r['cpu_ms_per_image']:.2f} CPU ms/img, "
              f"mean {r['mean_decoded_pixels']:.0f} decoded pixels", flush=True)

    if not args.skip_writer:
        cifar_train = Path(args.cifar) / "train"
        if not cifar_train.is_dir():
            raise SystemExit(f"unpacked CIFAR-10 not found at {cifar_train} (see /work/shared/datasets/README.md)")
        for w in [w for w in workers if w > 0]:
            r = time_writer(cifar_train, scratch / "writer-out", w)
            results["writer"].append({"workers": w, **r})
            print(f"writer CIFAR-10 train, {w} process(es): {r['images']} images in {r['seconds']:.1f} s = "
                  f"{r['images_per_sec']:.0f} images/s ({r['bytes'] / 1e6:.0f} MB)", flush=True)

    results["env"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "pillow": PIL.__version__, "webdataset": getattr(wds, "__version__", "1.0.2"),
                      "batch_size": args.batch_size, "batches": args.batches, "machine": platform.machine(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
