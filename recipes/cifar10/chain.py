"""The CIFAR-10 evidence in one command: shards -> MAE pretraining -> linear probe -> fine-tuning -> results table.

    python recipes/cifar10/chain.py --budget cpu      # ~30 min on a 2-core CPU: the MAE-vs-random gap at small budget
    python recipes/cifar10/chain.py --budget gpu      # one H100: the quality recipe (pretraining + fine-tuning ~25 min)
    python recipes/cifar10/chain.py --budget micro    # a 2-3 minute smoke test on the shipped sample (data/sample)
    python recipes/cifar10/chain.py --render-only     # redraw the loss curves and the page from docs/results/

Stages, each the project's own entry point run as a subprocess (`recipes/stages.py`; the recipe never imports
`pretrain/` or `finetune/`):
  1. data       the CIFAR-10 JPEG tarball (--tarball, else $TESSERA_CIFAR10_TARBALL) unpacked once into --cifar-dir,
                WebDataset shards by `data/make_shards.py` (train, test, and for the cpu budget a class-balanced
                `probe_train` subset); the micro budget uses `data/sample` as it is.
  2. pretrain   `pretrain/mae.py pretrain/configs/cifar10_<budget>.yaml`
  3. probe      `finetune/linprobe.py finetune/configs/cifar10_linprobe_<budget>.yaml`, MAE encoder and encoder=random
  4. finetune   `finetune/classify.py finetune/configs/cifar10_finetune_<budget>.yaml`, from MAE and from scratch
                (encoder=random): the same recipe, steps and batch size
  5. results    `recipes/cifar10/chain_report.py`: docs/results/cifar10_<budget>.json from the runs' run.json,
                metrics.jsonl and eval.json, the loss curve, and the budget's block of docs/RESULTS.md.

All recipe settings live in the YAML files; this script adds only paths (data, run directories, encoder). Stages
whose command is unchanged are reused from --work; `--fresh` starts over. Extra `key=value` overrides reach one stage
with `--pretrain-arg`, `--probe-arg`, `--finetune-arg` (repeatable).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import run_files
from recipes.cifar10.chain_report import render_page, write_results
from recipes.cifar10.shards import TARBALL_ENV, prepare_data, split_sizes
from recipes.report import fmt, fmt_seconds
from recipes.stages import REPO, InputError, StageError, now_iso, public_argv, run_stage

PROG = "recipes/cifar10/chain.py"
MARKER = ".tessera_recipe"  # in --work: a recipe made the folder, so --fresh may delete it
PATH_OPTIONS = {"--work": "WORK", "--cifar-dir": "CIFAR_DIR", "--tarball": "TARBALL", "--docs": "DOCS"}


@dataclass(frozen=True)
class Budget:
    name: str
    variant: str  # MAE variant; encoder=random uses it as arch= so both sides have the same architecture
    source: str  # "cifar": shards from the tarball; "sample": the shipped data/sample shards
    probe_per_class: int | None  # probe trains on this many images per class (None: the whole train split)
    summary: str


BUDGETS = {
    "micro": Budget("micro", "mae_vit_tiny_patch4_dec128d2b", "sample", None,
                    "smoke test on the shipped 4,000/1,000-image sample; checks the plumbing, not the quality"),
    "cpu": Budget("cpu", "mae_vit_tiny_patch4_dec128d2b", "cifar", 1000,
                  "about 30 minutes on a 2-core CPU: does the MAE-vs-random gap show at a small budget?"),
    "gpu": Budget("gpu", "mae_vit_tiny_patch2_dec192d4b", "cifar", None,
                  "one H100, pretraining + fine-tuning in about 25 minutes: the quality targets"),
}


def prepare_work(work: Path, fresh: bool) -> Path:
    """Create --work (with its marker); with --fresh empty it first, but only when a recipe made it."""
    if fresh and work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise InputError(f"--fresh would delete {work}, which no recipe created (no {MARKER}); pick another "
                             "--work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    return work


def stage_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def chain(args) -> dict:
    budget, work = BUDGETS[args.budget], prepare_work(Path(args.work).resolve(), args.fresh)
    args.work, env, py = str(work), stage_env(args.threads), sys.executable
    started, t0 = now_iso(), time.perf_counter()
    data_dir, probe_split, stages = prepare_data(budget, args, env)
    run_dirs = {key: work / key for key in ("pretrain", "probe_mae", "probe_random", "finetune_mae",
                                            "finetune_scratch")}
    encoder = run_dirs["pretrain"] / run_files.ENCODER
    reuse = not args.fresh and not stages  # new shards: every later stage runs again
    stages.append(run_stage("pretrain", [py, "pretrain/mae.py", f"pretrain/configs/cifar10_{budget.name}.yaml",
                                         f"data.train={data_dir}", f"run.output_dir={run_dirs['pretrain']}",
                                         *args.pretrain_arg], run_dirs["pretrain"], env, encoder, reuse))
    reuse = reuse and stages[-1]["reused"]  # a new encoder: every later stage runs again
    random_init = ["encoder=random", f"arch={budget.variant}"]
    probe = ("finetune/linprobe.py", f"finetune/configs/cifar10_linprobe_{budget.name}.yaml",
             f"data.train={data_dir}:{probe_split}", args.probe_arg)
    finetune = ("finetune/classify.py", f"finetune/configs/cifar10_finetune_{budget.name}.yaml",
                f"data.train={data_dir}", args.finetune_arg)
    for key, (script, config, data, extra), init in (
            ("probe_mae", probe, [f"encoder={encoder}"]), ("probe_random", probe, random_init),
            ("finetune_mae", finetune, [f"encoder={encoder}"]), ("finetune_scratch", finetune, random_init)):
        cmd = [py, script, config, data, *init, f"run.output_dir={run_dirs[key]}", *extra]
        stages.append(run_stage(key, cmd, run_dirs[key], env, run_dirs[key] / run_files.EVAL, reuse))
    header = {"name": f"cifar10_{budget.name}", "budget": budget.name, "summary": budget.summary,
              "started": started, "finished": now_iso(), "total_seconds": round(time.perf_counter() - t0, 1),
              "command": shlex.join(["python", PROG, *public_argv(args.argv, PATH_OPTIONS)]),
              "threads": env.get("OMP_NUM_THREADS"),
              "data": {"splits": split_sizes(data_dir), "probe_split": probe_split}}
    return write_results(header, stages, run_dirs, {"WORK": work, "CIFAR_DIR": Path(args.cifar_dir).resolve()},
                         Path(args.docs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="which recipe/budget to run (default: cpu)")
    p.add_argument("--work", default=None, help="folder for shards and runs (default: runs/cifar10_BUDGET)")
    p.add_argument("--tarball", default=None, help=f"CIFAR-10 JPEG tarball (default: ${TARBALL_ENV})")
    p.add_argument("--cifar-dir", default=str(REPO / "runs" / "cifar10_jpeg"),
                   help="where the tarball is (or gets) unpacked (default: runs/cifar10_jpeg)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="folder receiving RESULTS.md and results/ (default: "
                                                              "docs/)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    for stage in ("pretrain", "probe", "finetune"):
        p.add_argument(f"--{stage}-arg", action="append", default=[], metavar="KEY=VALUE",
                       help=f"extra {stage} override")
    p.add_argument("--render-only", action="store_true",
                   help="only redraw the loss curves and rebuild docs/RESULTS.md from docs/results/*.json")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.work = args.work or str(REPO / "runs" / f"cifar10_{args.budget}")
    if args.render_only:
        print(f"[recipe] wrote {render_page(Path(args.docs), redraw=True)}")
        return None
    try:
        record = chain(args)
    except InputError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except StageError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None
    top1 = {s["stage"]: fmt(s.get("eval", {}).get("top1")) for s in record["stages"]}
    print(f"[recipe] {args.budget}: probe MAE {top1['probe_mae']} vs random {top1['probe_random']}; fine-tune MAE "
          f"{top1['finetune_mae']} vs scratch {top1['finetune_scratch']}; total {fmt_seconds(record['total_seconds'])}",
          flush=True)
    return record


if __name__ == "__main__":
    main()
