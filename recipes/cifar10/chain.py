"""The CIFAR-10 evidence in one command: shards -> MAE pretraining -> linear probe -> fine-tuning -> results table.

    python recipes/cifar10/chain.py --budget cpu      # ~30 min on a 2-core CPU: the MAE-vs-random gap at small budget
    python recipes/cifar10/chain.py --budget gpu      # one H100: the quality recipe (pretraining + fine-tuning ~25 min)
    python recipes/cifar10/chain.py --budget micro    # a 2-3 minute smoke test on the shipped sample (data/sample)
    python recipes/cifar10/chain.py --render-only     # redraw the loss curves and the page from docs/results/

Stages, each an entry point run as a subprocess: data/make_shards.py on the CIFAR-10 JPEG tarball (--tarball or
$TESSERA_CIFAR10_TARBALL; micro uses data/sample), pretrain/mae.py (its k-NN monitor also scores the encoder at init
and raw pixels), then finetune/linprobe.py (the linear and the attentive probe) from the MAE encoder, from
encoder=random and from encoder=pixels (raw pixels), and finetune/classify.py from the MAE encoder and from scratch,
each with the same recipe (configs: cifar10_*_<budget>.yaml; --pretrain-arg, --probe-arg, --finetune-arg add
overrides). recipes/cifar10/chain_report.py writes the record, the loss curve and the
budget's block of docs/RESULTS.md. Stages whose command is unchanged are reused from --work; --fresh starts over.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch import run_files
from recipes.cifar10 import options
from recipes.cifar10.chain_report import render_page, write_results
from recipes.cifar10.shards import prepare_data, split_sizes
from recipes.page import fmt, fmt_seconds
from recipes.stages import REPO, run_stage

PROG = "recipes/cifar10/chain.py"
# budget: (MAE variant, also encoder=random's arch; probe_train images per class (None: train); data; the question)
BUDGETS = {
    "micro": ("mae_vit_tiny_patch4_dec128d2b", None, "sample",
              "smoke test on the shipped 4,000/1,000-image sample; checks the plumbing, not the quality"),
    "cpu": ("mae_vit_tiny_patch4_dec128d2b", 1000, "cifar",
            "about 30 minutes on a 2-core CPU: does the MAE-vs-random gap show at a small budget?"),
    "gpu": ("mae_vit_tiny_patch2_dec192d4b", None, "cifar",
            "one H100, pretraining + fine-tuning in about 25 minutes: the quality targets"),
}
RUNS = ("pretrain", "probe_mae", "probe_random", "probe_pixels", "attentive_mae", "attentive_random",
        "attentive_pixels", "finetune_mae", "finetune_scratch")


def chain(args) -> dict:
    variant, per_class, source, summary = BUDGETS[args.budget]
    (work, env, started, t0), py = options.start(args), sys.executable
    data, probe_split, stages = prepare_data(source, per_class, args, env)
    run_dirs = {key: work / key for key in RUNS}
    encoder = run_dirs["pretrain"] / run_files.ENCODER
    reuse = not args.fresh and not stages  # new shards: every later stage runs again
    stages.append(run_stage("pretrain", [py, "pretrain/mae.py", f"pretrain/configs/cifar10_{args.budget}.yaml",
                                         f"data.train={data}", f"run.output_dir={run_dirs['pretrain']}",
                                         *args.pretrain_arg], run_dirs["pretrain"], env, encoder, reuse))
    reuse = reuse and stages[-1]["reused"]  # a new encoder: every later stage runs again
    probe = ["finetune/linprobe.py", f"finetune/configs/cifar10_linprobe_{args.budget}.yaml",
             f"data.train={data}:{probe_split}"]
    attentive = ["finetune/linprobe.py", "finetune/configs/probe_attentive.yaml",
                 f"finetune/configs/cifar10_attentive_{args.budget}.yaml", f"data.train={data}:{probe_split}"]
    finetune = ["finetune/classify.py", f"finetune/configs/cifar10_finetune_{args.budget}.yaml", f"data.train={data}"]
    inits = {"mae": [f"encoder={encoder}"], "random": ["encoder=random", f"arch={variant}"],
             "pixels": ["encoder=pixels", f"arch={variant}"]}
    for key, head, init, extra in (
            *((f"probe_{k}", probe, inits[k], args.probe_arg) for k in ("mae", "random", "pixels")),
            *((f"attentive_{k}", attentive, inits[k], args.probe_arg) for k in ("mae", "random", "pixels")),
            ("finetune_mae", finetune, inits["mae"], args.finetune_arg),
            ("finetune_scratch", finetune, inits["random"], args.finetune_arg)):
        cmd = [py, *head, *init, f"run.output_dir={run_dirs[key]}", *extra]
        stages.append(run_stage(key, cmd, run_dirs[key], env, run_dirs[key] / run_files.EVAL, reuse))
    header = options.header(PROG, args, env, started, t0, name=f"cifar10_{args.budget}", budget=args.budget,
                            summary=summary)
    header["data"] = {"splits": split_sizes(data), "probe_split": probe_split}
    record = write_results(header, stages, run_dirs, options.folders(args), Path(args.docs))
    top1 = {s["stage"]: fmt(s.get("eval", {}).get("top1")) for s in record["stages"]}
    print(f"[recipe] {args.budget}: probe MAE {top1['probe_mae']} vs random {top1['probe_random']} vs pixels "
          f"{top1['probe_pixels']}; attentive MAE {top1['attentive_mae']} vs random {top1['attentive_random']}; "
          f"fine-tune MAE "
          f"{top1['finetune_mae']} vs scratch {top1['finetune_scratch']}; total {fmt_seconds(record['total_seconds'])}",
          flush=True)
    return record


def main(argv: list[str] | None = None) -> dict | None:
    p = options.parser(PROG, __doc__, "runs/cifar10_BUDGET")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="which recipe/budget to run (default: cpu)")
    for stage in ("pretrain", "probe", "finetune"):
        p.add_argument(f"--{stage}-arg", action="append", default=[], metavar="KEY=VALUE", help=f"{stage} override")
    return options.run(p, argv, lambda args: REPO / "runs" / f"cifar10_{args.budget}", chain,
                       lambda docs: render_page(docs, redraw=True))


if __name__ == "__main__":
    main()
