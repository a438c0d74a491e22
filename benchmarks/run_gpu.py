"""The GPU benchmark run: every case in priority order within a time budget, results labelled by the GPU.

    python benchmarks/run_gpu.py --out DIR             # on a GPU host, in the project's environment
    python benchmarks/run_gpu.py --cpu-check --out DIR # the same cases on CPU with a tiny model (the logic check)
    python benchmarks/run_gpu.py --list                # the cases;  --only loop_b16,profile_b16 runs some

Cases, most important first (a case that no longer fits --budget is skipped and listed):
 1. loop_b16        pretrain/mae.py (pretrain/configs/in1k_vit_base_1gpu.yaml: MAE-B/16, bf16, micro-batch 512, blocks
                    compiled) with data.loader=synthetic, then end to end from photo-like shards pre-resized to 256
                    (benchmarks/entry_loop.py). Targets >= 8,000 img/s; end to end >= 0.9 of synthetic.
 2. profile_b16     torch.profiler breakdown of the MAE-B step (benchmarks/pretrain_step.py --profile).
 3. ft_b16          finetune/classify.py (in1k_vit_base_1gpu.yaml, random encoder, the shards' 10 classes),
                    synthetic then end to end (RandAugment in the workers): target >= 4,000 img/s.
 4. step_b16_hf     the MAE-B step, eager, ours vs Hugging Face ViTMAE (batch 256).
 5. step_b16_block  MAE-B compiled with block masks (no host syncs): the mask's cost against step_b16_hf.
 6. loader_cpu      the host's CPU: PIL float path vs uint8 path, ms/img per core (benchmarks/loader_throughput.py).
 7. loop_l16        pretrain/mae.py with in1k_vit_large_1gpu.yaml, synthetic only.
 8. probe_b16       finetune/linprobe.py (streamed, linprobe_in1k_vit_base_1gpu.yaml), synthetic then end to end.

Writes into --out: summary_<GPU>.md (the tables; printed last), summary_<GPU>.json (every case's numbers and the
provenance: commit, packages, hardware), status.txt (exit code and seconds per case, skipped cases) and
bench_<GPU>.tar.gz (every case's JSON, log and profiler table). Generated shards go to --scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = "mae_vit_tiny_patch4_dec128d2b"
TARGETS = {"loop_b16": 8000, "ft_b16": 4000, "loop_l16": 3800, "probe_b16": 12000}  # images/s, synthetic
MEASURED_PEAK = 800.0  # TFLOP/s: the MFU the targets are stated in (benchmarks/common.py)


def cases(cpu: bool, scratch: Path, workers: int) -> list[tuple[str, list[list[str]], float]]:
    """(name, commands, seconds worth starting it with); each command is run as `python COMMAND`."""
    photo = str(scratch / ("photo-cpu" if cpu else "photo-256"))
    shards = ["benchmarks/make_bench_shards.py", "--output", photo, "--workers", str(workers), "--shards",
              *(["4", "--images", "48", "--min-px", "40", "--max-px", "72", "--resize", "36"] if cpu
                else ["32", "--images", "10240", "--resize", "256"])]
    loop = ["benchmarks/entry_loop.py", "--data", photo, "--window", "2" if cpu else "4"]
    common = [f"data.num_workers={workers}", "optim.grad_accum_steps=1"] if cpu else [f"data.num_workers={workers}"]
    down = ["encoder=random", "num_classes=10", f"data.test={photo}:train"]
    if cpu:  # the same cases on a tiny model at 32 px
        pre = [*common, f"model.name={TINY}", "model.img_size=32", "data.micro_batch=8", "run.steps=4"]
        ft = [*common, f"arch={TINY}", "model.img_size=32", "data.global_batch=8", "data.eval_batch=16", "run.steps=4"]
        probe, large = ft, pre
        step = ["--variant", TINY, "--batch", "8", "--steps", "2", "--warmup", "1", "--precision", "fp32"]
        profile = ["--override", "depth=2", "--batch", "8"]
    else:
        pre, ft, probe, large = [*common, "run.steps=16"], [*common, "run.steps=16"], [*common, "run.steps=8"], \
            [*common, "run.steps=16"]
        step = ["--batch", "256", "--steps", "20", "--warmup", "5", "--precision", "bf16"]
        profile = ["--batch", "512", "--precision", "bf16", "--compile"]
    return [
        ("loop_b16", [shards, [*loop, "--entry", "pretrain", "pretrain/configs/in1k_vit_base_1gpu.yaml", *pre]], 120),
        ("profile_b16", [["benchmarks/pretrain_step.py", "--profile", "--no-hf", "--steps", "3", "--warmup", "3",
                          *(["--variant", TINY] if cpu else []), *profile]], 60),
        ("ft_b16", [shards, [*loop, "--entry", "finetune", "finetune/configs/in1k_vit_base_1gpu.yaml", *down, *ft]],
         100),
        ("step_b16_hf", [["benchmarks/pretrain_step.py", *step]], 60),
        ("step_b16_block", [["benchmarks/pretrain_step.py", *step, "--no-hf", "--mask-type", "block",
                             *([] if cpu else ["--compile"])]], 60),
        ("loader_cpu", [["benchmarks/loader_throughput.py", "--scratch", str(scratch), "--rounds", "2",
                         *(["--batches", "1", "--images", "48", "--batch-size", "8", "--cases", "sample"] if cpu
                           else ["--batches", "2", "--images", "200", "--batch-size", "32"])]], 60),
        ("loop_l16", [[*loop, "--entry", "pretrain", "--modes", "synthetic",
                       "pretrain/configs/in1k_vit_large_1gpu.yaml", *large]], 100),
        ("probe_b16", [shards, [*loop, "--entry", "linprobe", "finetune/configs/linprobe_in1k_vit_base_1gpu.yaml",
                                *down, *probe]], 60),
    ]


def summarize(label: str, records: dict, prov: dict) -> str:
    """Markdown: the real loops' images/s against the targets, then the tables each case printed."""
    gpus = ", ".join(g["name"] for g in prov["hardware"]["gpus"]) or prov["hardware"]["cpu"]
    lines = [f"# Tessera GPU benchmark: {label}", "", f"{gpus}; torch {prov['packages']['torch']}; "
             f"{prov['hardware']['cpu_cores']} cores, {prov['hardware']['memory_gb']} GB; commit "
             f"{(prov['git']['commit'] or '?')[:7]}; {prov['time']}", "",
             "## The real loops (entry points), median window", "",
             "| case | mode | images/s | target | TFLOP/s | of 800 TFLOP/s | data wait |", "|---" * 7 + "|"]
    for name, rec in records.items():
        res = (rec.get("json") or {}).get("results", {})
        if not isinstance(res, dict):
            continue
        for mode in ("synthetic", "e2e"):
            if mode in res:
                r, tflops = res[mode], res[mode].get("tflops")
                lines.append(f"| {name} | {mode} | {r['images_per_sec']:,.0f} | "
                             f"{TARGETS.get(name, '') if mode == 'synthetic' else ''} | {tflops or '-'} | "
                             f"{f'{tflops / MEASURED_PEAK:.2f}' if tflops else '-'} | {r.get('data_wait')} |")
        if "e2e_over_synthetic" in res:
            lines.append(f"| {name} | e2e / synthetic | {res['e2e_over_synthetic']:.3f} | 0.9 | | | |")
    for name, rec in records.items():
        tables = re.findall(r"(?:^.*\n)?(?:^\|.*\|\n)+", rec["tail"], flags=re.M)
        lines += ["", f"## {name} (rc {rec['rc']}, {rec['seconds']:.0f} s)", "",
                  *([t.rstrip() + "\n" for t in tables[-3:]] or ["(no table: see the log in the archive)"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"), help="folder for the results")
    p.add_argument("--scratch", default=str(ROOT / "benchmarks" / "results" / "scratch"),
                   help="generated shards and per-case files (outside --out)")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for all cases")
    p.add_argument("--cpu-check", action="store_true", help="tiny model on CPU: check the run, not the numbers")
    p.add_argument("--only", default=None, help="comma list of case names")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    start, out, scratch = time.monotonic(), Path(args.out), Path(args.scratch)
    workers = 1 if args.cpu_check else max(1, len(os.sched_getaffinity(0)) - 2)
    todo = [c for c in cases(args.cpu_check, scratch, workers) if not args.only or c[0] in args.only.split(",")]
    if args.list:
        print("\n".join(f"{name}: " + " && ".join(" ".join(c) for c in cmds) for name, cmds, _ in todo))
        return 0
    work = scratch / "cases"  # per-case files, packed into the one archive at the end
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.cpu_check:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))

    from benchmarks.common import provenance

    prov = provenance()
    label = "cpu" if args.cpu_check else re.sub(r"[^A-Za-z0-9]+", "_", prov["hardware"]["gpus"][0]["name"] if
                                                prov["hardware"]["gpus"] else "cpu").strip("_")
    records, status = {}, []
    for name, cmds, min_s in todo:
        left = args.budget - (time.monotonic() - start)
        if left < min_s:
            status.append(f"{name} skipped: {left:.0f} s left < {min_s:.0f} s needed (run it alone: --only {name})")
            print(status[-1], flush=True)
            continue
        print(f"== {name} ({left:.0f} s left)", flush=True)
        t0, rc, log = time.monotonic(), 0, work / f"{name}.log"
        with log.open("w") as fh:
            for cmd in cmds:
                extra = [] if cmd[0].endswith("make_bench_shards.py") else ["--out", str(work / f"{name}.json")]
                extra += ["--table", str(work / f"{name}_kernels.txt")] if "--profile" in cmd else []
                fh.write(f"$ python {' '.join(cmd + extra)}\n")
                fh.flush()
                try:
                    rc = subprocess.run([sys.executable, *cmd, *extra], cwd=ROOT, env=env, stdout=fh,
                                        stderr=subprocess.STDOUT,
                                        timeout=max(10.0, args.budget - (time.monotonic() - start))).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
                if rc:
                    break
        result = work / f"{name}.json"
        records[name] = {"rc": rc, "seconds": time.monotonic() - t0, "tail": log.read_text()[-6000:],
                         "json": json.loads(result.read_text()) if result.exists() else None}
        status.append(f"{name} rc={rc} seconds={records[name]['seconds']:.0f}")
        print(status[-1], flush=True)
    (out / "status.txt").write_text("\n".join(status) + "\n")
    (out / f"summary_{label}.json").write_text(json.dumps(
        {"label": label, "provenance": prov, "cases": {k: {kk: vv for kk, vv in v.items() if kk != "tail"}
                                                       for k, v in records.items()}}, indent=1, default=str) + "\n")
    with tarfile.open(out / f"bench_{label}.tar.gz", "w:gz") as tar:
        for f in sorted(work.iterdir()):
            tar.add(f, arcname=f"bench_{label}/{f.name}")
    text = summarize(label, records, prov)
    (out / f"summary_{label}.md").write_text(text)
    print(text, flush=True)
    return 0 if all(r["rc"] == 0 for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
