"""The objectives and augmentation study at the CIFAR-10 CPU budget: every arm pretrains for the same wall-clock
(--minutes, 10 by default: the chain's MAE pretraining, `pretrain/configs/cifar10_cpu.yaml`), then the k-NN
monitor and the linear probe.

    python recipes/cifar10/objectives.py --threads 2          # ~1.5 h on a 2-core CPU
    python recipes/cifar10/objectives.py --render-only        # rebuild the page's blocks and the chart from the JSON

Arms: a random encoder (the init), MAE on normalised pixels (the chain's recipe as it is), MAE on HOG targets,
SimMIM, data2vec, and two milder pretraining augmentations of MAE (crop scale 0.5-1, and no crop). Equal wall-clock:
a calibration run of 40 steps per objective measures its images/s on this machine, and an objective gets the steps
that take --minutes at that rate (the cosine schedule then spans them; warm-up stays the recipe's 40 steps). The
augmentation arms cost what MAE costs per step and take MAE's step count.

Each stage is the project's own entry point run as a subprocess (`pretrain/mae.py`, `finetune/linprobe.py`), with
the chain's data (`recipes/cifar10/shards.py`: train 50,000, test 10,000, probe_train 1,000 per class). The k-NN
monitor runs once, at the end of pretraining: bank probe_train, queries the whole test split, mean-pooled patch
tokens (the probe's features). Results (`recipes/cifar10/objectives_report.py`): docs/results/objectives_cpu.json
from the runs' run.json, metrics.jsonl and eval.json, the chart objectives_cpu.png, and the study's blocks of
docs/RESULTS.md.
Finished stages with the same command are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch import run_files
from recipes.cifar10.chain import BUDGETS, PATH_OPTIONS, prepare_work, stage_env
from recipes.cifar10.objectives_report import NAME, render, write_results
from recipes.cifar10.shards import TARBALL_ENV, prepare_data
from recipes.run_summary import read_run
from recipes.stages import REPO, InputError, StageError, now_iso, public_argv, run_stage

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

    @property
    def augment(self) -> tuple[str, ...]:
        """The baseline augmentation unless the arm switches augmentation off (its crop keys would not apply)."""
        return () if "data.augment=none" in self.overrides else BASELINE_AUGMENT


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


def study(args) -> dict:
    work = prepare_work(Path(args.work).resolve(), args.fresh)
    args.work, env, py = str(work), stage_env(args.threads), sys.executable
    started, t0 = now_iso(), time.perf_counter()
    shards, probe_split, stages = prepare_data(BUDGETS["cpu"], args, env)
    batch = int(yaml.safe_load((REPO / CONFIG).read_text())["data"]["micro_batch"])
    base = [py, "pretrain/mae.py", CONFIG, f"data.train={shards}", "run.save_every=0", "run.progress=false",
            "run.trackers=none"]
    arms = [a for a in ARMS if not args.arm or a.name in args.arm]
    trains = any(a.name != "random" for a in arms)
    run_dirs, rates = {}, {}
    for arm in ARMS:  # MAE's rate sets the step count of every arm that is not calibrated itself
        if arm.calibrate and (arm in arms or (arm.name == "mae" and trains)):
            name, out = f"calibrate:{arm.name}", work / "calibrate" / arm.name
            cmd = [*base, *arm.augment, *arm.overrides, f"run.steps={CALIBRATION_STEPS}", "knn.enabled=false",
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
        cmd = [*base, *arm.augment, *arm.overrides, *steps, *knn, f"run.output_dir={out}"]
        stages.append(run_stage(f"pretrain:{arm.name}", cmd, out, env, out / run_files.ENCODER))
        cmd = [py, "finetune/linprobe.py", "finetune/configs/cifar10_linprobe_cpu.yaml",
               f"data.train={shards}:{probe_split}", f"encoder={out / run_files.ENCODER}",
               f"run.output_dir={probe_dir}", "run.progress=false"]
        stages.append(run_stage(f"probe:{arm.name}", cmd, probe_dir, env, probe_dir / run_files.EVAL))
        run_dirs.update({f"pretrain:{arm.name}": out, f"probe:{arm.name}": probe_dir})
    header = {"name": NAME, "started": started, "finished": now_iso(),
              "total_seconds": round(time.perf_counter() - t0, 1),
              "command": shlex.join(["python", PROG, *public_argv(args.argv, PATH_OPTIONS)]),
              "threads": env.get("OMP_NUM_THREADS"),
              "settings": {"minutes": args.minutes, "batch": batch, "calibration_steps": CALIBRATION_STEPS,
                           "calibration_skip": CALIBRATION_SKIP},
              "arms": {a.name: {"short": a.short, "label": a.label, "studies": list(a.studies)} for a in arms}}
    return write_results(header, stages, run_dirs, {"WORK": work, "CIFAR_DIR": Path(args.cifar_dir).resolve()},
                         Path(args.docs), {name: CALIBRATION_SKIP for name in run_dirs if name.startswith("calib")})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--work", default=str(REPO / "runs" / "cifar10_objectives"),
                   help="folder for shards and runs (default: runs/cifar10_objectives)")
    p.add_argument("--tarball", default=None, help=f"CIFAR-10 JPEG tarball (default: ${TARBALL_ENV})")
    p.add_argument("--cifar-dir", default=str(REPO / "runs" / "cifar10_jpeg"),
                   help="where the tarball is (or gets) unpacked (default: runs/cifar10_jpeg)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="folder receiving results/ and RESULTS.md")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="pretraining wall-clock of every arm, in minutes at the calibrated rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--arm", action="append", choices=[a.name for a in ARMS],
                   help="run only these arms (repeatable; default: all)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--render-only", action="store_true", help="rebuild the chart and the page's blocks from the JSON")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.render_only:
        if not (Path(args.docs) / "results" / f"{NAME}.json").is_file():
            parser.exit(2, f"{PROG}: error: {args.docs}/results/{NAME}.json does not exist; run the study first\n")
        print(f"[recipe] wrote {render(Path(args.docs))}")
        return None
    try:
        return study(args)
    except InputError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except StageError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None


if __name__ == "__main__":
    main()
