"""The CIFAR-10 evidence in one command: shards -> MAE pretraining -> linear probe -> fine-tuning -> results table.

    python recipes/cifar10/chain.py --budget cpu      # ~30 min on a 2-core CPU: the MAE-vs-random gap at small budget
    python recipes/cifar10/chain.py --budget gpu      # one H100: the quality recipe (pretraining + fine-tuning ~25 min)
    python recipes/cifar10/chain.py --budget micro    # a 2-3 minute smoke test on the shipped sample (data/sample)

Stages, each the project's own entry point run as a subprocess (the recipe never imports `pretrain/` or `finetune/`):
  1. data       unpack the CIFAR-10 JPEG tarball (once, to --cifar-dir) and write WebDataset shards with
                `data/make_shards.py` (train, test, and for the cpu budget a class-balanced `probe_train` subset);
                the micro budget uses `data/sample` as it is.
  2. pretrain   `pretrain/mae.py pretrain/configs/cifar10_<budget>.yaml` -> encoder.safetensors, metrics.jsonl
  3. probe      `finetune/linprobe.py finetune/configs/cifar10_linprobe_<budget>.yaml`, MAE encoder and encoder=random
  4. finetune   `finetune/classify.py finetune/configs/cifar10_finetune_<budget>.yaml`, from MAE and from scratch
                (encoder=random): the same recipe, steps and batch size
  5. table      docs/results/cifar10_<budget>.json (every number, command and wall-clock), the pretraining loss
                curve as a PNG, and docs/RESULTS.md rebuilt from every budget's JSON (recipes/cifar10/templates/).

The tarball is --tarball, else $TESSERA_CIFAR10_TARBALL, else ../shared/datasets/cifar10-jpg.tar.gz beside the
checkout. All recipe settings live in the YAML files; this script adds only paths (data, run directories, encoder).
Stages whose result already exists in --work are reused (their recorded wall-clock is kept); `--fresh` starts over.
Extra `key=value` overrides reach one stage with `--pretrain-arg`, `--probe-arg`, `--finetune-arg` (repeatable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from recipes.cifar10.record import collect
from recipes.cifar10.results_doc import fmt, fmt_seconds, render_all, write_outputs
from recipes.cifar10.shards import TARBALL_ENV, default_tarball, prepare_data
from recipes.cifar10.stages import REPO, ChainError, ChainInputError, now_iso, run_stage

PROG = "recipes/cifar10/chain.py"
MARKER = ".cifar10_chain"  # in --work: this script made the folder, so --fresh may delete it


@dataclass(frozen=True)
class Budget:
    name: str
    variant: str  # MAE variant; encoder=random uses it as arch= so both sides have the same architecture
    source: str  # "cifar": shards from the tarball; "sample": the shipped data/sample shards
    probe_per_class: int | None  # probe trains on this many images per class (None: the whole train split)
    summary: str

    @property
    def pretrain_config(self) -> str:
        return f"pretrain/configs/cifar10_{self.name}.yaml"

    @property
    def probe_config(self) -> str:
        return f"finetune/configs/cifar10_linprobe_{self.name}.yaml"

    @property
    def finetune_config(self) -> str:
        return f"finetune/configs/cifar10_finetune_{self.name}.yaml"


BUDGETS = {
    "micro": Budget("micro", "mae_vit_tiny_patch4_dec128d2b", "sample", None,
                    "smoke test on the shipped 4,000/1,000-image sample; checks the plumbing, not the quality"),
    "cpu": Budget("cpu", "mae_vit_tiny_patch4_dec128d2b", "cifar", 1000,
                  "about 30 minutes on a 2-core CPU: does the MAE-vs-random gap show at a small budget?"),
    "gpu": Budget("gpu", "mae_vit_tiny_patch2_dec192d4b", "cifar", None,
                  "one H100, pretraining + fine-tuning in about 25 minutes: the quality targets"),
}


def prepare_work(work: Path, fresh: bool) -> None:
    """Create --work (with its marker); with --fresh empty it first, but only when this script made it."""
    if fresh and work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise ChainInputError(f"--fresh would delete {work}, which this script did not create (no {MARKER}); "
                                  "pick another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()


def chain(args) -> dict:
    budget = BUDGETS[args.budget]
    work = Path(args.work).resolve()
    args.work = str(work)
    prepare_work(work, args.fresh)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    t_start = time.perf_counter()
    started = now_iso()

    data_dir, probe_split, stages = prepare_data(budget, args, env)
    py = sys.executable

    pt_dir = work / "pretrain"
    encoder = pt_dir / "encoder.safetensors"
    pt_cmd = [py, "pretrain/mae.py", budget.pretrain_config, f"data.train={data_dir}", f"run.output_dir={pt_dir}",
              *args.pretrain_arg]
    reuse = not args.fresh and not stages  # new shards: every later stage runs again
    stages.append(run_stage("pretrain", pt_cmd, pt_dir, env, encoder, reuse))
    reuse = reuse and stages[-1]["reused"]  # a new encoder: every later stage runs again

    random_init = ["encoder=random", f"arch={budget.variant}"]
    runs = {}
    for key, script, config, encoder_args, extra in (
            ("probe_mae", "finetune/linprobe.py", budget.probe_config, [f"encoder={encoder}"], args.probe_arg),
            ("probe_random", "finetune/linprobe.py", budget.probe_config, random_init, args.probe_arg),
            ("finetune_mae", "finetune/classify.py", budget.finetune_config, [f"encoder={encoder}"], args.finetune_arg),
            ("finetune_scratch", "finetune/classify.py", budget.finetune_config, random_init, args.finetune_arg)):
        run_dir = work / key
        split_args = [f"data.train_split={probe_split}"] if key.startswith("probe") else []
        cmd = [py, script, config, f"data.path={data_dir}", *split_args, *encoder_args, f"run.output_dir={run_dir}",
               *extra]
        stages.append(run_stage(key, cmd, run_dir, env, run_dir / "eval.json", reuse))
        runs[key] = json.loads((run_dir / "eval.json").read_text())

    total = time.perf_counter() - t_start
    result = collect(budget, args, data_dir, probe_split, pt_dir, runs, stages, total, started)
    write_outputs(result, pt_dir, Path(args.docs))
    return result


def build_parser() -> argparse.ArgumentParser:
    tmp = Path(tempfile.gettempdir())
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="which recipe/budget to run (default: cpu)")
    p.add_argument("--work", default=None, help=f"scratch folder for shards and runs (default: {tmp}/tessera-cifar10-"
                                                "BUDGET)")
    p.add_argument("--tarball", default=None, help=f"CIFAR-10 JPEG tarball (default: ${TARBALL_ENV}, else "
                                                   f"{default_tarball()})")
    p.add_argument("--cifar-dir", default=str(tmp / "cifar10"),
                   help="where the tarball is (or gets) unpacked (default: %(default)s)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="folder receiving RESULTS.md and results/ "
                                                              "(default: docs/)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--pretrain-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretraining override")
    p.add_argument("--probe-arg", action="append", default=[], metavar="KEY=VALUE", help="extra linear-probe override")
    p.add_argument("--finetune-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fine-tuning override")
    p.add_argument("--render-only", action="store_true",
                   help="only redraw the loss curves and rebuild docs/RESULTS.md from docs/results/*.json")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv_record = [PROG, *(sys.argv[1:] if argv is None else argv)]
    args.work = args.work or str(Path(tempfile.gettempdir()) / f"tessera-cifar10-{args.budget}")
    args.tarball = args.tarball or str(default_tarball())
    if args.render_only:
        print(f"[chain] wrote {render_all(Path(args.docs))}")
        return None
    try:
        result = chain(args)
    except ChainInputError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except ChainError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None
    r = result["runs"]
    print(f"[chain] {args.budget}: probe MAE {fmt(r['probe_mae']['top1'])} vs random {fmt(r['probe_random']['top1'])}; "
          f"fine-tune MAE {fmt(r['finetune_mae']['top1'])} vs scratch {fmt(r['finetune_scratch']['top1'])}; "
          f"total {fmt_seconds(result['total_seconds'])}", flush=True)
    return result


if __name__ == "__main__":
    main()
