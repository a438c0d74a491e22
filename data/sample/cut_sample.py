"""Cut the shipped sample dataset (data/sample/) out of the CIFAR-10 JPEG archive.

    python data/sample/cut_sample.py --archive CIFAR10_JPG_TARBALL [--output data/sample]

Takes a class-balanced random subset (fixed seed) of the original JPEG files, without re-encoding them, and writes
it with data/make_shards.py as gzip-compressed shards (a 32 px JPEG is ~0.9 KB, a tar member header 0.5 KB, so
compression roughly halves the size): 400 train images per class in 4 shards and 100 test images per class in 2
shards, plus one dataset.json describing both splits. The result must stay under 5 MB.
"""

from __future__ import annotations

import argparse
import random
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from data.make_shards import write_shards

HERE = Path(__file__).resolve().parent
PLAN = {"train": (400, 4), "test": (100, 2)}  # split -> (images per class, shards)
SIZE_LIMIT = 5_000_000


def cut(archive: str, output: Path, seed: int = 0) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
        by_split_class: dict[tuple[str, str], list[tarfile.TarInfo]] = defaultdict(list)
        for m in members:
            parts = Path(m.name).parts  # split/class/NNNN.jpg
            if len(parts) == 3 and parts[0] in PLAN:
                by_split_class[(parts[0], parts[1])].append(m)
        rng = random.Random(seed)
        chosen = []
        for (split, _cls), ms in sorted(by_split_class.items()):
            ms = sorted(ms, key=lambda m: m.name)
            chosen += rng.sample(ms, PLAN[split][0])
        with tempfile.TemporaryDirectory(prefix="cifar-cut-") as tmp:
            tar.extractall(tmp, members=sorted(chosen, key=lambda m: m.offset), filter="data")
            results = {}
            for split, (per_class, n_shards) in PLAN.items():
                total = per_class * len({c for s, c in by_split_class if s == split})
                results[split] = write_shards(Path(tmp) / split, output, split=split, shard_size=total // n_shards,
                                              shuffle=True, seed=seed, workers=1, compress=True, overwrite=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", required=True, help="the CIFAR-10 JPEG ImageFolder archive (cifar10-jpg.tar.gz)")
    p.add_argument("--output", default=str(HERE), help="output folder (default: data/sample next to this script)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output)
    results = cut(args.archive, out, args.seed)
    for split, res in results.items():
        print(f"{split}: {res['num_samples']} images, {res['num_shards']} shards, {len(res['skipped'])} skipped")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"total on disk: {total} bytes")
    if total >= SIZE_LIMIT:
        raise SystemExit(f"sample is {total} bytes, over the {SIZE_LIMIT} byte limit: reduce PLAN")


if __name__ == "__main__":
    main()
