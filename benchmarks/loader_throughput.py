"""CPU cost of the training loader per image: the PIL float path against the uint8 path, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/loader_throughput.py --out benchmarks/results/loader.json

Cases: photo-like 256-500 px JPEGs (make_bench_shards.py), the same pre-resized to 256, the 32 px sample. "PIL float"
(the old default: PIL decode and crop, ToTensor, Normalize) against "uint8" (decode_jpeg or reduced decode, uint8
crop, normalised on the device), through the real loader (no workers) in alternating rounds: CPU ms per image, the
median round with the spread; also the decode alone. (Equal pixels up to rounding: tests/test_transforms.py.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import webdataset as wds

from benchmarks import make_bench_shards
from benchmarks.common import ROOT, print_table, provenance, write_json
from data.decode import decode_image, load_image, uint8_pixels
from data.info import resolve
from data.train_stream import build_train_loader
from data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

SAMPLE = str(ROOT / "data" / "sample")
TARGETS_MS = {"photo-like 256-500 px -> 224": 1.2, "pre-resized 256 -> 224": 0.8}  # issue 13, per core


def time_paths(spec, img_size, mean, std, args) -> dict[str, dict]:
    """CPU ms/img of each path: `--rounds` alternating rounds of `--batches` batches, after `--warmup` batches."""
    its = {out: iter(build_train_loader(spec, batch_size=args.batch_size, seed=0, num_workers=0, shuffle_buffer=64,
                                        transform=pretrain_transform(img_size, mean, std, output=out)))
           for out in ("float", "uint8")}
    rounds, batches = {name: [] for name in its}, {}
    for _ in range(args.warmup):
        batches = {name: next(it) for name, it in its.items()}
    for _ in range(args.rounds):
        for name, it in its.items():
            c0 = time.process_time()
            for _ in range(args.batches):
                batches[name] = next(it)
            rounds[name].append(1000 * (time.process_time() - c0) / (args.batches * args.batch_size))
    return {name: {"cpu_ms_per_image": statistics.median(v), "min": min(v), "max": max(v), "rounds": v,
                   "batch_dtype": str(batches[name]["image"].dtype)} for name, v in rounds.items()}


def time_decode(spec: str, limit: int = 200) -> dict:
    """CPU ms per image to decode at full size: PIL (load) vs torchvision decode_jpeg (the uint8 path's decoder)."""
    found = list(wds.DataPipeline(wds.SimpleShardList(resolve(spec).urls), wds.tarfile_to_samples()))[:limit]
    out = {"images": len(found), "mean_kb": sum(len(s["jpg"]) for s in found) / len(found) / 1e3}
    for name, fn in (("pil", lambda s: load_image(decode_image(s))),
                     ("decode_jpeg", lambda s: uint8_pixels(decode_image(s)))):
        fn(found[0])
        c0 = time.process_time()
        for s in found:
            fn(s)
        out[f"{name}_ms"] = 1000 * (time.process_time() - c0) / len(found)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    p.add_argument("--scratch", default=str(make_bench_shards.SCRATCH), help="folder of the generated shards")
    p.add_argument("--images", type=int, default=300, help="photo-like images to generate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=2, help="batches per path per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", default="photo,resized,sample", help="comma list of photo, resized, sample")
    args = p.parse_args(argv)
    cases, load = [], [os.getloadavg()]
    for key, name, resize in (("photo", "photo-like 256-500 px -> 224", None), ("resized", "pre-resized 256 -> 224",
                                                                                256)):
        if key in args.cases:
            out = Path(args.scratch) / (f"photo-{args.images}" + (f"-r{resize}" if resize else ""))
            make_bench_shards.main(["--output", str(out), "--images", str(args.images), "--shards", "4", "--workers",
                                    "1", *(["--resize", str(resize)] if resize else [])])
            cases.append((name, str(out), 224, IMAGENET_MEAN, IMAGENET_STD))
    if "sample" in args.cases:
        cases.append(("32 px sample -> 32", SAMPLE, 32, CIFAR10_MEAN, CIFAR10_STD))
    results, rows = {"cases": []}, []
    for name, spec, size, mean, std in cases:
        res = time_paths(spec, size, mean, std, args)
        decode = time_decode(spec) if size != 32 else {}
        results["cases"].append({"case": name, "spec": spec, "img_size": size, **res, "decode": decode})
        old, new = res["float"], res["uint8"]
        rows.append({"case": name, "old": old["cpu_ms_per_image"], "old_spread": f"{old['min']:.2f}-{old['max']:.2f}",
                     "new": new["cpu_ms_per_image"], "new_spread": f"{new['min']:.2f}-{new['max']:.2f}",
                     "speedup": old["cpu_ms_per_image"] / new["cpu_ms_per_image"], "target": TARGETS_MS.get(name),
                     **decode})
    results["table"] = print_table(rows, [
        ("case", "case"), ("old", "PIL float ms/img"), ("old_spread", "(min-max)"), ("new", "uint8 ms/img"),
        ("new_spread", "(min-max)"), ("speedup", "old/new"), ("target", "target ms/img"), ("mean_kb", "mean JPEG KB"),
        ("pil_ms", "decode PIL ms"), ("decode_jpeg_ms", "decode_jpeg ms")],
        title=f"CPU ms per image, one core, {args.rounds} alternating rounds x {args.batches} batches of "
              f"{args.batch_size}")
    results["env"] = {**provenance(), "loadavg_before_after": [*load, os.getloadavg()],
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "args": vars(args)}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
