"""The CIFAR-10 evidence in one command: shards -> MAE pretraining -> linear probe -> fine-tuning -> results table.

    python launch/cifar10_chain.py --budget cpu      # ~30 min on a 2-core CPU: the MAE-vs-random gap at small budget
    python launch/cifar10_chain.py --budget gpu      # one H100: the quality recipe (pretraining + fine-tuning ~25 min)
    python launch/cifar10_chain.py --budget micro    # a 2-3 minute smoke test on the shipped sample (data/sample)

Stages, each the project's own entry point run as a subprocess (`launch/` never imports `pretrain/` or `finetune/`):
  1. data       unpack the CIFAR-10 JPEG tarball (once, to --cifar-dir) and write WebDataset shards with
                `data/make_shards.py` (train, test, and for the cpu budget a class-balanced `probe_train` subset);
                the micro budget uses `data/sample` as it is.
  2. pretrain   `pretrain/mae.py pretrain/configs/cifar10_<budget>.yaml` -> encoder.safetensors, metrics.jsonl
  3. probe      `finetune/linprobe.py finetune/configs/cifar10_linprobe_<budget>.yaml`, MAE encoder and encoder=random
  4. finetune   `finetune/classify.py finetune/configs/cifar10_finetune_<budget>.yaml`, from MAE and from scratch
                (encoder=random): the same recipe, steps and batch size
  5. table      docs/results/cifar10_<budget>.json (every number, command and wall-clock), the pretraining loss
                curve as a PNG (drawn with PIL), and docs/RESULTS.md rebuilt from every budget's JSON.

All recipe settings live in the YAML files; this script adds only paths (data, run directories, encoder). Stages whose
result already exists in --work are reused (their recorded wall-clock is kept); `--fresh` starts over. Extra
`key=value` overrides reach one stage with `--pretrain-arg`, `--probe-arg`, `--finetune-arg` (repeatable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python launch/cifar10_chain.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.chain_data import prepare_data
from launch.chain_record import collect
from launch.chain_stages import REPO, ChainError, now_iso, run_stage
from launch.results_doc import fmt, fmt_seconds, render_all, write_outputs

DEFAULT_TARBALL = "/work/shared/datasets/cifar10-jpg.tar.gz"


# ------------------------------------------------------------------------------------------------- budgets


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


# ------------------------------------------------------------------------------------------------- the chain


def chain(args) -> dict:
    budget = BUDGETS[args.budget]
    work = Path(args.work or f"/tmp/tessera-cifar10-{budget.name}").resolve()
    args.work = str(work)
    marker = work / ".cifar10_chain"  # --fresh deletes only folders this script made
    if args.fresh and work.exists() and any(work.iterdir()):
        if not marker.exists():
            raise ChainError(f"--fresh would delete {work}, which this script did not create (no {marker.name}); "
                             "pick another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    reuse = not args.fresh
    t_start = time.perf_counter()
    started = now_iso()

    data_dir, probe_split, stages = prepare_data(budget, args, env)
    py = sys.executable

    pt_dir = work / "pretrain"
    pt_cmd = [py, "pretrain/mae.py", budget.pretrain_config, f"data.train={data_dir}", f"run.output_dir={pt_dir}",
              *args.pretrain_arg]
    reuse = reuse and not stages  # new shards: every later stage runs again
    stages.append(run_stage("pretrain", pt_cmd, pt_dir, env, pt_dir / "encoder.safetensors", reuse))
    reuse = reuse and stages[-1]["reused"]  # a new encoder: every later stage runs again
    encoder = pt_dir / "encoder.safetensors"

    runs = {}
    for key, script, config, encoder_args, extra in (
            ("probe_mae", "finetune/linprobe.py", budget.probe_config, [f"encoder={encoder}"], args.probe_arg),
            ("probe_random", "finetune/linprobe.py", budget.probe_config,
             ["encoder=random", f"arch={budget.variant}"], args.probe_arg),
            ("finetune_mae", "finetune/classify.py", budget.finetune_config, [f"encoder={encoder}"], args.finetune_arg),
            ("finetune_scratch", "finetune/classify.py", budget.finetune_config,
             ["encoder=random", f"arch={budget.variant}"], args.finetune_arg)):
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



# ------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="which recipe/budget to run (default: cpu)")
    p.add_argument("--work", default=None, 
                   help="scratch folder for shards and runs (default: /tmp/tessera-cifar10-BUDGET)")
    p.add_argument("--tarball", default=DEFAULT_TARBALL, help=f"CIFAR-10 JPEG tarball (default: {DEFAULT_TARBALL})")
    p.add_argument("--cifar-dir", default="/tmp/cifar10", 
                   help="where the tarball is (or gets) unpacked (default: /tmp/cifar10)")
    p.add_argument("--docs", default=str(REPO / "docs"), 
                   help="folder receiving RESULTS.md and results/ (default: docs/)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--pretrain-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretraining override")
    p.add_argument("--probe-arg", action="append", default=[], metavar="KEY=VALUE", help="extra linear-probe override")
    p.add_argument("--finetune-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fine-tuning override")
    p.add_argument("--render-only", action="store_true",
                   help="only redraw the loss curves and rebuild docs/RESULTS.md from docs/results/*.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    args.argv_record = ["launch/cifar10_chain.py", *(sys.argv[1:] if argv is None else argv)]
    if args.render_only:
        print(f"[chain] wrote {render_all(Path(args.docs))}")
        return None
    try:
        result = chain(args)
    except ChainError as exc:
        raise SystemExit(f"cifar10_chain: {exc}") from None
    r = result["runs"]
    print(f"[chain] {args.budget}: probe MAE {fmt(r['probe_mae']['top1'])} vs random {fmt(r['probe_random']['top1'])}; "
          f"fine-tune MAE {fmt(r['finetune_mae']['top1'])} vs scratch {fmt(r['finetune_scratch']['top1'])}; "
          f"total {fmt_seconds(result['total_seconds'])}", flush=True)
    return result


if __name__ == "__main__":
    main()
