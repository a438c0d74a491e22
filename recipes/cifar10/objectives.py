"""The objectives and augmentation study at the CIFAR-10 CPU budget: every arm pretrains for the same wall-clock
(--minutes, the chain's MAE pretraining by default), then the k-NN monitor and the linear probe.

    python recipes/cifar10/objectives.py --threads 2          # ~1.5 h on a 2-core CPU
    python recipes/cifar10/objectives.py --render-only        # rebuild the page's blocks and the chart from the JSON

A 40-step calibration run per objective measures its images/s here, and it gets the steps that take --minutes at that
rate (the augmentation arms take MAE's). The k-NN monitor runs once, at the end (bank probe_train, the whole test
split, mean-pooled patch tokens). recipes/cifar10/objectives_report.py writes the record, the chart and the study's
blocks of docs/RESULTS.md. Finished stages with the same command are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from launch import run_files
from recipes.cifar10 import options
from recipes.cifar10.chain import BUDGETS
from recipes.cifar10.objectives_report import NAME, render, write_results
from recipes.cifar10.shards import prepare_data
from recipes.record import read_run
from recipes.stages import REPO, StageError, run_stage

PROG = "recipes/cifar10/objectives.py"
CONFIG = "pretrain/configs/cifar10_cpu.yaml"  # every arm's recipe; arms differ only by their overrides
# the ImageNet recipe's crop, which the CPU recipe dropped after this study (its yaml says why); some arms override it
BASELINE_AUGMENT = ("data.augment=crop", "data.crop_scale=0.2,1.0", "data.hflip=0.5")
CALIBRATION_STEPS, CALIBRATION_SKIP = 40, 10  # images/s: median over logged steps after the first 10 (warm-up)


class Arm(NamedTuple):
    name: str
    short: str  # in the finding's rankings
    label: str
    studies: tuple[str, ...]  # the tables it appears in: "objective", "augmentation"
    overrides: tuple[str, ...]  # after the baseline augmentation, unless they switch augmentation off
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


def augment(arm: Arm) -> tuple[str, ...]:
    """The arm's overrides after the baseline augmentation, whose crop keys would not apply to data.augment=none."""
    return (*(() if "data.augment=none" in arm.overrides else BASELINE_AUGMENT), *arm.overrides)


def study(args) -> dict:
    (work, env, started, t0), py = options.start(args), sys.executable
    _, per_class, source, _ = BUDGETS["cpu"]
    shards, probe_split, stages = prepare_data(source, per_class, args, env)
    batch = int(yaml.safe_load((REPO / CONFIG).read_text())["data"]["micro_batch"])
    base = [py, "pretrain/mae.py", CONFIG, f"data.train={shards}", "run.save_every=0", "run.progress=false",
            "run.trackers=none"]
    arms = [a for a in ARMS if not args.arm or a.name in args.arm]
    trains = any(a.name != "random" for a in arms)
    run_dirs, rates = {}, {}
    for arm in ARMS:  # MAE's rate sets the step count of every arm that is not calibrated itself
        if arm.calibrate and (arm in arms or (arm.name == "mae" and trains)):
            name, out = f"calibrate:{arm.name}", work / "calibrate" / arm.name
            cmd = [*base, *augment(arm), f"run.steps={CALIBRATION_STEPS}", "knn.enabled=false",
                   "vis.num_images=0", f"run.output_dir={out}"]
            stages.append(run_stage(name, cmd, out, env, out / run_files.METRICS))
            run_dirs[name] = out
            rates[arm.name] = read_run(out, CALIBRATION_SKIP).get("metrics", {}).get("images_per_sec")
    if trains and not rates.get("mae"):
        raise StageError("the MAE calibration run logged no images/s; every arm's step count is relative to it")
    knn = [f"knn.bank={shards}:{probe_split}", "knn.bank_size=null", f"knn.query={shards}:test", "knn.query_size=null",
           "run.eval_every=0", "model.pool=avg"]
    for arm in arms:
        rate = rates[arm.name] if arm.calibrate else rates.get("mae")
        steps = [f"run.steps={max(1, round(args.minutes * 60 * rate / batch))}"] if arm.name != "random" else []
        out, probe_dir = work / arm.name, work / f"{arm.name}_probe"
        cmd = [*base, *augment(arm), *steps, *knn, f"run.output_dir={out}"]
        stages.append(run_stage(f"pretrain:{arm.name}", cmd, out, env, out / run_files.ENCODER))
        cmd = [py, "finetune/linprobe.py", "finetune/configs/cifar10_linprobe_cpu.yaml",
               f"data.train={shards}:{probe_split}", f"encoder={out / run_files.ENCODER}",
               f"run.output_dir={probe_dir}", "run.progress=false"]
        stages.append(run_stage(f"probe:{arm.name}", cmd, probe_dir, env, probe_dir / run_files.EVAL))
        run_dirs.update({f"pretrain:{arm.name}": out, f"probe:{arm.name}": probe_dir})
    header = options.header(PROG, args, env, started, t0, name=NAME)
    header.update(settings={"minutes": args.minutes, "batch": batch, "calibration_steps": CALIBRATION_STEPS,
                            "calibration_skip": CALIBRATION_SKIP},
                  arms={a.name: {"short": a.short, "label": a.label, "studies": list(a.studies)} for a in arms})
    return write_results(header, stages, run_dirs, options.folders(args), Path(args.docs),
                         {name: CALIBRATION_SKIP for name in run_dirs if name.startswith("calibrate:")})


def main(argv: list[str] | None = None) -> dict | None:
    p = options.parser(PROG, __doc__, "runs/cifar10_objectives")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="pretraining wall-clock of every arm, in minutes at the calibrated rate (default: %(default)s)")
    p.add_argument("--arm", action="append", choices=[a.name for a in ARMS], help="run only these arms (repeatable)")
    return options.run(p, argv, lambda args: REPO / "runs" / "cifar10_objectives", study, render)


if __name__ == "__main__":
    main()
