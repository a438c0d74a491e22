"""CPU cost of the training loader per image: the PIL float path against the uint8 path, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/loader_throughput.py --out benchmarks/results/loader.json

Data: photo-like 256-500 px JPEG shards made by benchmarks/make_bench_shards.py from the shipped sample (once, under
--scratch), the same images pre-resized to shorter side 256 (`--resize 256`), and the shipped 32 px sample.
Paths (MAE pretraining augmentation, RandomResizedCrop(scale 0.2-1) + flip, same crop and flip draws):
- "PIL float": PIL decode + bicubic crop + ToTensor + Normalize, float32 batches (the old default);
- "uint8": crop-aware reduced decode / libjpeg-turbo `decode_jpeg` + antialiased bicubic on uint8 tensors, uint8
  batches (data/resized_crop.py), normalised later on the device.
Each case runs the real loader in this process (`build_train_loader`, num_workers=0: shard reading, shuffling,
per-sample seeding, decode, augmentation and collation all counted) and reports CPU ms per image
(`time.process_time`, so other processes' load counts less than in wall time). The two paths are timed in
alternating rounds (A B A B ...) so changing machine load hits both alike; the median round is reported, with the
spread. Decode alone (PIL vs decode_jpeg, full size) is timed too; `--agreement N` compares the two paths' pixels on N
images of the 32 px sample (same seeds). Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from benchmarks import make_bench_shards  # noqa: E402
from benchmarks.common import print_table, provenance, write_json  # noqa: E402
from data.decode import decode_image, load_image, uint8_pixels  # noqa: E402
from data.info import resolve  # noqa: E402
from data.train_stream import build_train_loader  # noqa: E402
from data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, pretrain_transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "benchmarks" / "results" / "scratch"  # generated shards (benchmarks/results/ is git-ignored)
TARGETS_MS = {"photo-like 256-500 px -> 224": 1.2, "pre-resized 256 -> 224": 0.8}  # issue 13, per core


def ensure_shards(scratch: Path, images: int, resize: int | None) -> str:
    out = scratch / (f"photo-{images}" + (f"-r{resize}" if resize else ""))
    argv = ["--output", str(out), "--images", str(images), "--shards", "4", "--workers", "1"]
    make_bench_shards.main(argv + (["--resize", str(resize)] if resize else []))
    return str(out)


def _loader(spec, img_size, mean, std, output, batch_size, workers=0):
    tf = pretrain_transform(img_size, mean, std, output=output)
    return build_train_loader(spec, batch_size=batch_size, transform=tf, seed=0, num_workers=workers,
                              shuffle_buffer=64)


def time_paths(spec, img_size, mean, std, batch_size, warmup, batches, rounds) -> dict[str, dict]:
    """CPU ms/img of each path, `rounds` alternating rounds of `batches` batches (after `warmup`)."""
    its = {out: iter(_loader(spec, img_size, mean, std, out, batch_size)) for out in ("float", "uint8")}
    for it in its.values():
        for _ in range(warmup):
            next(it)
    per_round: dict[str, list[float]] = {k: [] for k in its}
    for _ in range(rounds):
        for name, it in its.items():
            c0 = time.process_time()
            for _ in range(batches):
                batch = next(it)
            per_round[name].append(1000 * (time.process_time() - c0) / (batches * batch_size))
            per_round[name + "_dtype"] = str(batch["image"].dtype)
    return {name: {"cpu_ms_per_image": statistics.median(v), "min": min(v), "max": max(v), "rounds": v,
                   "batch_dtype": per_round[name + "_dtype"]}
            for name, v in per_round.items() if not name.endswith("_dtype")}


def time_decode(spec: str, limit: int = 200) -> dict:
    """CPU ms per image to decode at full size: PIL (load) vs torchvision decode_jpeg (the uint8 path's decoder)."""
    samples = list(wds.DataPipeline(wds.SimpleShardList(resolve(spec).urls), wds.tarfile_to_samples()))[:limit]
    out = {"images": len(samples), "mean_kb": sum(len(s["jpg"]) for s in samples) / len(samples) / 1e3}
    for name, fn in (("pil", lambda s: load_image(decode_image(s))),
                     ("decode_jpeg", lambda s: uint8_pixels(decode_image(s)))):
        fn(samples[0])
        c0 = time.process_time()
        for s in samples:
            fn(s)
        out[f"{name}_ms"] = 1000 * (time.process_time() - c0) / len(samples)
    return out


def pixel_agreement(spec: str, img_size: int, n: int) -> list[dict]:
    """The uint8 path against the PIL float path on the first n images, same per-image seed: |difference| in grey
    levels (the float path is mapped back to 0-255 with mean 0.5, std 1/255)."""
    from data.seeding import seeded_global_rngs
    from data.transforms import eval_transform

    samples = list(wds.DataPipeline(wds.SimpleShardList(resolve(spec).urls), wds.tarfile_to_samples()))[:n]
    mean, std = (0.5,) * 3, (1 / 255,) * 3
    pairs = [("pretrain crop (scale 0.2-1)", pretrain_transform(img_size, mean, std),
              pretrain_transform(img_size, output="uint8")),
             ("probe crop (scale 0.08-1)", pretrain_transform(img_size, mean, std, scale=(0.08, 1.0)),
              pretrain_transform(img_size, scale=(0.08, 1.0), output="uint8")),
             ("eval", eval_transform(img_size, mean, std), eval_transform(img_size, output="uint8"))]
    out = []
    for name, old, new in pairs:
        diffs = []
        for i, s in enumerate(samples):
            with seeded_global_rngs(i):
                a = old(decode_image(s)) + 127.5
            with seeded_global_rngs(i):
                b = new(decode_image(s)).float()
            diffs.append((a - b).abs().flatten())
        d = torch.cat(diffs)
        out.append({"transform": name, "images": len(samples), "mean_abs_levels": float(d.mean()),
                    "max_abs_levels": float(d.max()), "share_differing": float((d > 0.5).float().mean())})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    p.add_argument("--scratch", default=str(SCRATCH), help="folder for the generated shards (default: "
                                                             "benchmarks/results/scratch)")
    p.add_argument("--images", type=int, default=300, help="photo-like images to generate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=2, help="batches per path per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--cases", default="photo,resized,sample", help="comma list of photo, resized, sample")
    p.add_argument("--agreement", type=int, default=0,
                   help="also compare the two paths' pixels on this many images of the 32 px sample")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    wanted = args.cases.split(",")
    cases = []
    if "photo" in wanted:
        cases.append(("photo-like 256-500 px -> 224", ensure_shards(scratch, args.images, None), args.img_size,
                      IMAGENET_MEAN, IMAGENET_STD))
    if "resized" in wanted:
        cases.append(("pre-resized 256 -> 224", ensure_shards(scratch, args.images, 256), args.img_size,
                      IMAGENET_MEAN, IMAGENET_STD))
    if "sample" in wanted:
        cases.append(("32 px sample -> 32", str(ROOT / "data" / "sample"), 32, CIFAR10_MEAN, CIFAR10_STD))

    load_before = os.getloadavg()
    rows, results = [], {"cases": []}
    for name, spec, size, mean, std in cases:
        res = time_paths(spec, size, mean, std, args.batch_size, args.warmup, args.batches, args.rounds)
        entry = {"case": name, "spec": spec, "img_size": size, **{k: v for k, v in res.items()}}
        if size != 32:
            entry["decode"] = time_decode(spec)
        results["cases"].append(entry)
        old, new = res["float"]["cpu_ms_per_image"], res["uint8"]["cpu_ms_per_image"]
        rows.append({"case": name, "old": old, "old_spread": f"{res['float']['min']:.2f}-{res['float']['max']:.2f}",
                     "new": new, "new_spread": f"{res['uint8']['min']:.2f}-{res['uint8']['max']:.2f}",
                     "speedup": old / new, "target": TARGETS_MS.get(name),
                     "decode_pil": entry.get("decode", {}).get("pil_ms"),
                     "decode_tv": entry.get("decode", {}).get("decode_jpeg_ms"),
                     "kb": entry.get("decode", {}).get("mean_kb")})
    load_after = os.getloadavg()
    table = print_table(rows, [("case", "case"), ("old", "PIL float ms/img"), ("old_spread", "(min-max)"),
                               ("new", "uint8 ms/img"), ("new_spread", "(min-max)"), ("speedup", "old/new"),
                               ("target", "target ms/img"), ("kb", "mean JPEG KB"),
                               ("decode_pil", "decode PIL ms"), ("decode_tv", "decode_jpeg ms")],
                        title=f"CPU ms per image, one core, {args.rounds} alternating rounds x {args.batches} "
                              f"batches of {args.batch_size}")
    results["table"] = table
    if args.agreement:
        results["agreement"] = pixel_agreement(str(ROOT / "data" / "sample"), 32, args.agreement)
        print_table(results["agreement"], [("transform", "32 px sample: uint8 vs PIL path"), ("images", "images"),
                                           ("mean_abs_levels", "mean |diff| (levels)"), ("max_abs_levels", "max"),
                                           ("share_differing", "share of values differing")])
    results["env"] = {**provenance(), "loadavg_before": load_before, "loadavg_after": load_after,
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "args": vars(args)}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
