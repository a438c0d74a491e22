"""The CIFAR-10 recipes' data: the JPEG tarball (--tarball, else $TESSERA_CIFAR10_TARBALL: train/ and test/
ImageFolder trees) unpacked once, a class-balanced probe subset, WebDataset shards by data/make_shards.py."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from launch.run_record import read_record
from recipes.stages import REPO, InputError, StageError, run_stage

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
TARBALL_ENV = "TESSERA_CIFAR10_TARBALL"


def ensure_cifar(tarball: Path | None, cifar_dir: Path) -> Path:
    """`cifar_dir` with train/ and test/ ImageFolder trees, unpacked from `tarball` when missing (into a private
    folder first, then renamed into place: an interrupted unpack leaves no half folder)."""
    if (cifar_dir / "train").is_dir() and (cifar_dir / "test").is_dir():
        return cifar_dir
    if tarball is None or not tarball.is_file():
        raise InputError(f"CIFAR-10 tarball not found: {tarball} (and {cifar_dir} has no train/ and test/); pass "
                         f"--tarball PATH or set {TARBALL_ENV}=PATH (a .tar.gz holding train/ and test/ JPEG folders), "
                         "or --cifar-dir with an unpacked copy")
    if cifar_dir.exists() and any(cifar_dir.iterdir()):
        raise InputError(f"cannot unpack into {cifar_dir}: it holds files but no train/ and test/; pick another "
                         "--cifar-dir")
    tmp = cifar_dir.parent / f"{cifar_dir.name}.{os.getpid()}"
    print(f"[recipe] data: unpacking {tarball} -> {cifar_dir}", flush=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    if not (tmp / "train").is_dir() or not (tmp / "test").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{tarball} does not hold train/ and test/ folders; pass the CIFAR-10 JPEG tarball with "
                         "--tarball")
    tmp.replace(cifar_dir)  # over an empty folder too
    return cifar_dir


def class_subset(train_dir: Path, out_dir: Path, per_class: int) -> Path:
    """An ImageFolder of symbolic links to the first `per_class` images (sorted names) of every class."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for cls in sorted(d for d in train_dir.iterdir() if d.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if len(files) < per_class:
            raise InputError(f"class folder {cls} has {len(files)} images, fewer than the {per_class} asked for")
        (out_dir / cls.name).mkdir(parents=True)
        for f in files[:per_class]:
            (out_dir / cls.name / f.name).symlink_to(f.resolve())
    return out_dir


def split_sizes(shard_dir: Path) -> dict[str, int]:
    """Images per split, from the shards' dataset.json ({} when there are no shards yet)."""
    splits = read_record(shard_dir / "dataset.json").get("splits", {})
    return {k: int(v.get("num_samples", 0)) for k, v in splits.items()}


def prepare_data(source: str, per_class: int | None, args, env) -> tuple[Path, str, list[dict]]:
    """(dataset folder, the probe's training split, stage records): `data/sample` as it is, or CIFAR-10 shards in
    --work (train, test and, with `per_class`, a class-balanced probe_train) unless they are there already."""
    if source == "sample":
        return REPO / "data" / "sample", "train", []
    tarball = args.tarball or os.environ.get(TARBALL_ENV)
    cifar = ensure_cifar(Path(tarball) if tarball else None, Path(args.cifar_dir).resolve())
    shards = Path(args.work) / "shards"
    # shard sizes: 20 train shards, so up to 20 loader workers (x ranks) each read their own
    want = {"train": (cifar / "train", CIFAR_TRAIN, 2500), "test": (cifar / "test", CIFAR_TEST, 1000)}
    if per_class:
        want["probe_train"] = (None, per_class * 10, 1000)
    have, records = split_sizes(shards), []
    for split, (src, n, shard_size) in want.items():
        if have.get(split) == n:
            print(f"[recipe] data: reusing {shards}:{split} ({n} images)", flush=True)
            continue
        src = src or class_subset(cifar / "train", Path(args.work) / "probe_subset", per_class)
        cmd = [sys.executable, "data/make_shards.py", "--input", str(src), "--output", str(shards), "--split", split,
               "--shard-size", str(shard_size), "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--overwrite"]
        records.append(run_stage(f"shards:{split}", cmd, Path(args.work) / f"shards_{split}", env, None, reuse=False))
    got = split_sizes(shards)
    if bad := [split for split, (_, n, _) in want.items() if got.get(split) != n]:
        raise StageError(f"{shards}:{bad[0]} holds {got.get(bad[0])} images, expected {want[bad[0]][1]} (see the "
                         "make_shards log)")
    return shards, "probe_train" if per_class else "train", records
