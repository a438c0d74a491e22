"""The objectives and augmentation study at the CIFAR-10 CPU budget: every arm pretrains for the same wall-clock
(--minutes, 10 by default: the chain's MAE pretraining, `pretrain/configs/cifar10_cpu.yaml`), then the k-NN
monitor and the linear probe.

    python recipes/cifar10/objectives.py --threads 2          # ~1.5 h on a 2-core CPU
    python recipes/cifar10/objectives.py --render-only        # rebuild the table and chart from the JSON

Arms: a random encoder (the init), MAE on normalised pixels (the chain's recipe as it is), MAE on HOG targets,
SimMIM, data2vec, and two milder pretraining augmentations of MAE (crop scale 0.5-1, and no crop). Equal wall-clock:
a calibration run of 40 steps per objective measures its images/s on this machine, and an objective gets the steps
that take --minutes at that rate (the cosine schedule then spans them; warm-up stays the recipe's 40 steps). The
augmentation arms cost what MAE costs per step and take MAE's step count.

Each stage is the project's own entry point run as a subprocess (`pretrain/mae.py`, `finetune/linprobe.py`), with
the chain's data (`recipes/cifar10/shards.py`: train 50,000, test 10,000, probe_train 1,000 per class). The k-NN
monitor runs once, at the end of pretraining: bank probe_train, queries the whole test split, mean-pooled patch
tokens (the probe's features). Results: docs/results/objectives_cpu.json, .md and .png, then docs/RESULTS.md.
Finished stages with the same command are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launch.metrics import read_metrics
from recipes.cifar10.chain import BUDGETS, prepare_work
from recipes.cifar10.objectives_doc import write_study
from recipes.cifar10.record import git_commit, hardware, read_yaml
from recipes.cifar10.shards import default_tarball, prepare_data
from recipes.cifar10.stages import REPO, ChainError, ChainInputError, now_iso, run_stage

PROG = "recipes/cifar10/objectives.py"
CONFIG = "pretrain/configs/cifar10_cpu.yaml"  # every arm's recipe; arms differ only by their overrides
# every arm starts from the ImageNet recipe's crop, stated here because the CPU recipe itself dropped it after this
# study (pretrain/configs/cifar10_cpu.yaml says why); the augmentation arms override it
BASELINE_AUGMENT = ("data.augment=crop", "data.crop_scale=0.2,1.0", "data.hflip=0.5")
CALIBRATION_STEPS, CALIBRATION_SKIP = 40, 10  # images/s: median over logged steps after the first 10 (warm-up)


@dataclass(frozen=True)
class Arm:
    name: str
    short: str  # in the finding's rankings
    label: str
    studies: tuple[str, ...]  # the tables it appears in: "objective", "augmentation"
    overrides: tuple[str, ...]
    calibrate: bool = True  # False: costs what MAE costs per step, so it takes MAE's step count


ARMS = (
    Arm("random", "random", "random encoder (the init, no training)", ("objective",),
        ("run.steps=1", "optim.lr=1e-30", "optim.warmup_steps=0", "vis.num_images=0"), calibrate=False),
    Arm("mae", "MAE", "MAE, normalised pixels, crop 0.2-1 + flip", ("objective", "augmentation"), ()),
    Arm("mae_hog", "MAE-HOG", "MAE, HOG targets", ("objective",), ("model.target=hog", "model.norm_pix_loss=false")),
    Arm("simmim", "SimMIM", "SimMIM, pixels, block masks 0.6", ("objective",),
        ("model.objective=simmim", "model.norm_pix_loss=false", "model.mask_ratio=0.6")),
    Arm("data2vec", "data2vec", "data2vec, top-6 blocks, block masks 0.6, EMA 0.99 -> 0.999", ("objective",),
        ("model.objective=data2vec", "model.norm_pix_loss=false", "model.mask_ratio=0.6", "data2vec.ema_decay=0.99",
         "data2vec.ema_end_decay=0.999")),
    Arm("crop05", "crop 0.5-1", "MAE, crop 0.5-1 + flip", ("augmentation",), ("data.crop_scale=0.5,1.0",),
        calibrate=False),
    Arm("nocrop", "no crop", "MAE, no crop, no flip (data.augment=none)", ("augmentation",), ("data.augment=none",),
        calibrate=False),
)


def median_images_per_sec(metrics: Path, skip: int = 0) -> float | None:
    rates = [r["images_per_sec"] for r in read_metrics(metrics) if r.get("step", 0) > skip and "images_per_sec" in r]
    return statistics.median(rates) if rates else None


def study(args) -> dict:
    work = Path(args.work).resolve()
    args.work = str(work)
    prepare_work(work, args.fresh)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    threads = str(args.threads) if args.threads else os.environ.get("OMP_NUM_THREADS")
    started, t0 = now_iso(), time.perf_counter()
    shards, probe_split, stages = prepare_data(BUDGETS["cpu"], args, env)
    py = sys.executable
    batch = int(read_yaml(REPO / CONFIG)["data"]["micro_batch"])
    base = [py, "pretrain/mae.py", CONFIG, f"data.train={shards}", "run.save_every=0",
            "run.progress=false", "run.trackers=none", *BASELINE_AUGMENT]
    arms = [a for a in ARMS if not args.arm or a.name in args.arm]

    trains = any(a.name != "random" for a in arms)
    rates = {}
    for arm in ARMS:
        if not arm.calibrate or (arm not in arms and not (arm.name == "mae" and trains)):  # MAE's rate: every arm's
            continue
        out = work / "calibrate" / arm.name
        cmd = [*base, *arm.overrides, f"run.steps={CALIBRATION_STEPS}", "knn.enabled=false", "vis.num_images=0",
               f"run.output_dir={out}"]
        stages.append(run_stage(f"calibrate:{arm.name}", cmd, out, env, out / "metrics.jsonl"))
        rates[arm.name] = median_images_per_sec(out / "metrics.jsonl", CALIBRATION_SKIP)
    if trains and not rates.get("mae"):
        raise ChainError("the MAE calibration run logged no images/s; every arm's step count is relative to it")

    knn = [f"knn.bank={shards}:{probe_split}", "knn.bank_size=null", f"knn.query={shards}:test", "knn.query_size=null",
           "knn.every=0", "knn.pool=avg"]
    results = {}
    for arm in arms:
        rate = rates[arm.name] if arm.calibrate else rates.get("mae")
        steps = max(1, round(args.minutes * 60 * rate / batch)) if rate and arm.name != "random" else None
        out = work / arm.name
        cmd = [*base, *arm.overrides, *([f"run.steps={steps}"] if steps else []), *knn, f"run.output_dir={out}"]
        pretrain = run_stage(f"pretrain:{arm.name}", cmd, out, env, out / "encoder.safetensors")
        probe_dir = work / f"{arm.name}_probe"
        probe_cmd = [py, "finetune/linprobe.py", "finetune/configs/cifar10_linprobe_cpu.yaml", f"data.path={shards}",
                     f"data.train_split={probe_split}", f"encoder={out / 'encoder.safetensors'}",
                     f"run.output_dir={probe_dir}", "run.progress=false"]
        probe = run_stage(f"probe:{arm.name}", probe_cmd, probe_dir, env, probe_dir / "eval.json")
        stages += [pretrain, probe]
        results[arm.name] = arm_result(arm, out, probe_dir, pretrain, probe, rates.get(arm.name))

    result = {"started": started, "finished": now_iso(), "total_seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(args.argv_record), "git_commit": git_commit(),
              "hardware": hardware(threads), "minutes": args.minutes, "batch": batch,
              "calibration": {"steps": CALIBRATION_STEPS, "skip": CALIBRATION_SKIP, "images_per_sec": rates},
              "data": {"shards": str(shards), "bank": probe_split, "queries": "test"}, "arms": results,
              "stages": [{k: s.get(k) for k in ("stage", "command", "seconds", "reused")} for s in stages]}
    write_study(result, Path(args.docs))
    return result


def arm_result(arm: Arm, out: Path, probe_dir: Path, pretrain: dict, probe: dict, calib_rate: float | None) -> dict:
    metrics = read_metrics(out / "metrics.jsonl")
    logged = [r for r in metrics if isinstance(r.get("loss"), (int, float))]  # null: a window of skipped steps
    losses = [r["loss"] for r in logged]
    knn = [r["knn_top1"] for r in metrics if "knn_top1" in r]
    evaluation = json.loads((probe_dir / "eval.json").read_text())
    last = metrics[-1] if metrics else {}
    return {"short": arm.short, "label": arm.label, "studies": list(arm.studies), "overrides": list(arm.overrides),
            "steps": last.get("step"), "epochs": last.get("epoch"), "pretrain_seconds": pretrain["seconds"],
            "median_images_per_sec": median_images_per_sec(out / "metrics.jsonl"),
            "calibration_images_per_sec": calib_rate,
            "loss_first": statistics.fmean(losses[:20]) if losses else None,
            "loss_last": statistics.fmean(losses[-20:]) if losses else None,
            "loss_curve": [[r["step"], round(r["loss"], 5)] for r in logged],
            "knn_top1": 100.0 * knn[-1] if knn else None,
            "probe_top1": evaluation["top1"], "probe_top5": evaluation["top5"], "probe_images": evaluation["n_images"],
            "probe_seconds": probe["seconds"]}


def build_parser() -> argparse.ArgumentParser:
    tmp = Path(tempfile.gettempdir())
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--work", default=str(tmp / "tessera-cifar10-objectives"),
                   help="scratch folder for shards and runs (default: %(default)s)")
    p.add_argument("--tarball", default=None, help=f"CIFAR-10 JPEG tarball (default: {default_tarball()})")
    p.add_argument("--cifar-dir", default=str(tmp / "cifar10"), help="where the tarball is unpacked (default: "
                                                                     "%(default)s)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="folder receiving results/ and RESULTS.md")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="pretraining wall-clock of every arm, in minutes at the calibrated rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--arm", action="append", choices=[a.name for a in ARMS],
                   help="run only these arms (repeatable; default: all)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--render-only", action="store_true", help="rebuild the .md, chart and RESULTS.md from the JSON")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv_record = [PROG, *(sys.argv[1:] if argv is None else argv)]
    args.tarball = args.tarball or str(default_tarball())
    if args.render_only:
        path = Path(args.docs) / "results" / "objectives_cpu.json"
        if not path.is_file():
            parser.exit(2, f"{PROG}: error: {path} does not exist; run the study first\n")
        write_study(json.loads(path.read_text()), Path(args.docs))
        return None
    try:
        return study(args)
    except ChainInputError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except ChainError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None


if __name__ == "__main__":
    main()
