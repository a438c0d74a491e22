"""The GPU benchmark run: one command of at most 9 minutes that leaves at most 8 files, results labelled by GPU.

    python benchmarks/run_gpu.py                    # on a GPU host: every case in priority order, within --budget
    python benchmarks/run_gpu.py --cpu-check        # the same cases on CPU with a tiny model (the logic check)
    python benchmarks/run_gpu.py --list             # the cases
    python benchmarks/run_gpu.py --only loop_b16,profile_b16

Cases, most important first (a case that no longer fits the budget is skipped and listed):
 1. loop_b16      pretrain/mae.py itself (pretrain/configs/in1k_vit_base_1gpu.yaml: MAE-B/16, bf16, micro-batch 512,
                  blocks compiled) on synthetic batches, then end to end from photo-like shards pre-resized to 256
                  (benchmarks/entry_loop.py): images/s, MFU, end-to-end / synthetic. Targets >= 8,000 img/s, >= 0.9.
 2. profile_b16   torch.profiler breakdown of that step: GEMM / attention / elementwise / norm / copies / optimizer.
 3. ft_b16        finetune/classify.py (in1k_vit_base_1gpu.yaml, random encoder, the shards' 10 classes), synthetic
                  then end to end (RandAugment in the workers): target >= 4,000 img/s.
 4. step_b16_hf   MAE-B step through the shared loop, eager, ours vs Hugging Face ViTMAE (batch 256).
 5. step_b16_block  MAE-B compiled with block masks (no host syncs): the mask's cost against loop_b16.
 6. loader_cpu    the host's CPU: PIL float path vs uint8 path, ms/img per core (benchmarks/loader_throughput.py).
 7. loop_l16      pretrain/mae.py with in1k_vit_large_1gpu.yaml, synthetic only.
 8. probe_b16     finetune/linprobe.py (streamed, in1k linprobe_1gpu config), synthetic then end to end.

Writes into --out (default $OUT or /tmp/tessera-bench), at most 8 files: summary_<GPU>.md (the tables, read this),
summary_<GPU>.json (every case's numbers), status.txt (exit code and seconds per case, skipped cases),
machine_<GPU>.json (nvidia-smi, nproc, lscpu, RAM, /dev/shm, versions), bench_<GPU>.tar.gz (every case's JSON,
log and profiler table). The summary is printed last. Generated shards go to --scratch, outside --out.
The GPU image may lack webdataset: with its wheels in .whl/ (carried with the call), they are installed into
/tmp/site first.
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
B16, L16 = "mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b"


def ensure_webdataset(py: str, env: dict) -> None:
    if subprocess.run([py, "-c", "import webdataset"], env=env, capture_output=True).returncode == 0:
        return
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl") if p.name.startswith(("webdataset", "braceexpand")))
    if not wheels:
        print("warning: webdataset missing and no .whl/ wheels: the shard cases will fail", flush=True)
        return
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                    "/tmp/site", *wheels], check=False)
    env["PYTHONPATH"] = "/tmp/site" + os.pathsep + env.get("PYTHONPATH", "")


def gpu_label() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def cases(cpu: bool, scratch: Path, workers: int) -> list[tuple[str, list[list[str]], float]]:
    """(name, commands, minimum seconds worth starting it with). Commands are argv lists run with python."""
    photo = str(scratch / ("photo-cpu" if cpu else "photo-256"))
    shards = ["benchmarks/make_bench_shards.py", "--output", photo, "--shards", "4" if cpu else "32",
              "--workers", str(workers)] + (["--images", "48", "--min-px", "40", "--max-px", "72", "--resize", "36"]
                                            if cpu else ["--images", "10240", "--resize", "256"])
    if cpu:  # the same cases on a tiny model at 32 px
        pre = ["model.name=" + TINY, "model.img_size=32", "data.micro_batch=8", "optim.grad_accum_steps=1",
               f"data.num_workers={workers}", "run.steps=4"]
        ft = ["arch=" + TINY, "data.img_size=32", "data.global_batch=8", "optim.grad_accum_steps=1",
              f"data.num_workers={workers}", "run.steps=4", "data.eval_batch_size=16"]
        probe = ft
        step = ["--variant", TINY, "--batch", "8", "--steps", "2", "--warmup", "1", "--precision", "fp32"]
        win, large, prof_batch, variant = "2", ["model.name=" + TINY, "model.img_size=32"], "8", TINY
    else:
        pre = [f"data.num_workers={workers}", "run.steps=16"]
        ft = [f"data.num_workers={workers}", "run.steps=16"]
        probe = [f"data.num_workers={workers}", "run.steps=8"]
        step = ["--variant", B16, "--batch", "256", "--steps", "20", "--warmup", "5", "--window", "5",
                "--precision", "bf16"]
        win, large, prof_batch, variant = "4", [], "512", B16
    loop = ["benchmarks/entry_loop.py", "--window", win]
    return [
        ("loop_b16", [shards, loop + ["--entry", "pretrain", "--data", photo,
                                      "pretrain/configs/in1k_vit_base_1gpu.yaml", *pre]], 120),
        ("profile_b16", [["benchmarks/profile_step.py", "--variant", variant, "--batch", prof_batch, "--steps", "3",
                          "--warmup", "3", "--precision", "fp32" if cpu else "bf16"] + ([] if cpu else ["--compile"])
                         + (["--override", "depth=2"] if cpu else [])], 60),
        ("ft_b16", [shards, loop + ["--entry", "finetune", "--data", photo, "finetune/configs/in1k_vit_base_1gpu.yaml",
                                    "encoder=random", "num_classes=10", "data.test_split=train", *ft]], 100),
        ("step_b16_hf", [["benchmarks/pretrain_step.py", *step]], 60),
        ("step_b16_block", [["benchmarks/pretrain_step.py", *step, "--no-hf", "--mask-type", "block"]
                            + ([] if cpu else ["--compile"])], 60),
        ("loader_cpu", [["benchmarks/loader_throughput.py", "--scratch", str(scratch), "--rounds", "2",
                         "--batches", "1" if cpu else "2", "--images", "48" if cpu else "200", "--batch-size",
                         "8" if cpu else "32"] + (["--cases", "sample"] if cpu else [])], 60),
        ("loop_l16", [loop + ["--entry", "pretrain", "--modes", "synthetic", "--data", photo,
                              "pretrain/configs/in1k_vit_large_1gpu.yaml", *pre, *large]], 100),
        ("probe_b16", [shards, loop + ["--entry", "linprobe", "--data", photo,
                                       "finetune/configs/linprobe_in1k_vit_base_1gpu.yaml", "encoder=random",
                                       "num_classes=10", "data.test_split=train", *probe]], 60),
    ]


def summarize(out: Path, label: str, records: dict, machine: dict) -> str:
    """Markdown tables: the headline loop numbers against the targets, then each case's own table."""
    from models.flops import mae_flops_per_image

    lines = [f"# Tessera GPU benchmark: {label}", "",
             f"{machine.get('gpu') or machine.get('cpu')}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}; "
             f"nproc {machine.get('nproc')}, RAM {machine.get('mem_total_gb') or 0:.0f} GB, /dev/shm "
             f"{machine.get('dev_shm_gb') or 0:.0f} GB; {machine.get('date_utc')} UTC", ""]
    head = ["| case | mode | images/s | target | notes |", "|---|---|---|---|---|"]
    targets = {"loop_b16": 8000, "ft_b16": 4000}
    rows = []
    for name in ("loop_b16", "ft_b16", "loop_l16", "probe_b16"):
        doc = records.get(name, {}).get("json")
        if not doc:
            continue
        res = doc["results"]
        for mode in ("synthetic", "e2e"):
            if mode in res:
                note = ""
                if name in ("loop_b16", "loop_l16") and "cpu" not in label:
                    flops = mae_flops_per_image(B16 if name == "loop_b16" else L16)["train"]
                    note = f"MFU {res[mode]['images_per_sec'] * flops / 800e12:.2f} of 800 TFLOP/s"
                rows.append(f"| {name} | {mode} | {res[mode]['images_per_sec']:,.0f} | "
                            f"{targets.get(name, '') if mode == 'synthetic' else ''} | {note} |")
        if "e2e_over_synthetic" in res:
            rows.append(f"| {name} | e2e / synthetic | {res['e2e_over_synthetic']:.3f} | 0.9 | |")
    if rows:
        lines += ["## The real loops (entry points), median window", "", *head, *rows, ""]
    for name, rec in records.items():
        lines += [f"## {name} (rc {rec['rc']}, {rec['seconds']:.0f} s)", ""]
        tables = re.findall(r"(?:^.*\n)?(?:^\|.*\|\n)+", rec.get("tail", ""), flags=re.M)
        lines += [t.rstrip() + "\n" for t in tables[-3:]] or ["(no table: see the log in the archive)", ""]
    text = "\n".join(lines) + "\n"
    (out / f"summary_{label}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/tessera-bench"))
    p.add_argument("--scratch", default="/tmp/tessera-bench-scratch", help="generated shards (not returned)")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for all cases (the call allows 540)")
    p.add_argument("--cpu-check", action="store_true", help="tiny model on CPU: check the run, not the numbers")
    p.add_argument("--only", default=None, help="comma list of case names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    start = time.monotonic()
    out, scratch = Path(args.out), Path(args.scratch)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    workers = 1 if args.cpu_check else max(1, nproc - 2)
    todo = cases(args.cpu_check, scratch, workers)
    if args.list:
        for name, cmds, _ in todo:
            print(f"{name}: " + " && ".join(" ".join(c) for c in cmds))
        return 0
    if args.only:
        wanted = args.only.split(",")
        todo = [c for c in todo if c[0] in wanted]
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    work = scratch / "cases"  # per-case files, packed into the one archive at the end
    if work.exists():
        for f in work.iterdir():
            f.unlink()
    work.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    if args.cpu_check:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    ensure_webdataset(args.python, env)
    label = "cpu" if args.cpu_check else gpu_label()

    import torch

    from benchmarks.common import machine_facts, machine_info

    machine = {**machine_info(torch.device("cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu")),
               **machine_facts()}
    (out / f"machine_{label}.json").write_text(json.dumps(machine, indent=1, default=str) + "\n")
    records, status, made = {}, [], set()
    for name, cmds, min_s in todo:
        left = args.budget - (time.monotonic() - start)
        if left < min_s:
            status.append(f"{name} skipped: {left:.0f} s left < {min_s:.0f} s needed (run it alone: --only {name})")
            print(status[-1], flush=True)
            continue
        t0, rc, log = time.monotonic(), 0, work / f"{name}.log"
        print(f"== {name} ({left:.0f} s left)", flush=True)
        with log.open("w") as fh:
            for cmd in cmds:
                if cmd[0].endswith("make_bench_shards.py") and cmd[2] in made:
                    continue
                extra = ["--out", str(work / f"{name}.json")] if not cmd[0].endswith("make_bench_shards.py") else []
                if cmd[0].endswith("profile_step.py"):
                    extra += ["--table", str(work / f"{name}_kernels.txt")]
                remaining = max(10.0, args.budget - (time.monotonic() - start))
                fh.write(f"$ {args.python} {' '.join(cmd + extra)}\n")
                fh.flush()
                try:
                    rc = subprocess.run([args.python, *cmd, *extra], cwd=ROOT, env=env, stdout=fh,
                                        stderr=subprocess.STDOUT, timeout=remaining).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
                if rc != 0:
                    break
                if cmd[0].endswith("make_bench_shards.py"):
                    made.add(cmd[2])
        seconds = time.monotonic() - t0
        tail = log.read_text()[-6000:]
        doc = None
        if (work / f"{name}.json").exists():
            doc = json.loads((work / f"{name}.json").read_text())
        records[name] = {"rc": rc, "seconds": seconds, "tail": tail, "json": doc}
        status.append(f"{name} rc={rc} seconds={seconds:.0f}")
        print(status[-1], flush=True)
        if rc != 0:
            print("\n".join(tail.splitlines()[-8:]), flush=True)
    (out / "status.txt").write_text("\n".join(status) + "\n")
    (out / f"summary_{label}.json").write_text(json.dumps(
        {"label": label, "machine": machine, "cases": {k: {kk: vv for kk, vv in v.items() if kk != "tail"}
                                                       for k, v in records.items()}}, indent=1, default=str) + "\n")
    with tarfile.open(out / f"bench_{label}.tar.gz", "w:gz") as tar:
        for f in sorted(work.iterdir()):
            tar.add(f, arcname=f"bench_{label}/{f.name}")
    text = summarize(out, label, records, machine)
    print(text, flush=True)
    print(f"files: {sorted(f.name for f in out.iterdir())} ({time.monotonic() - start:.0f} s)", flush=True)
    return 0 if all(r["rc"] == 0 for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
