"""The real training loops timed: an entry point run as a subprocess with `data.loader=synthetic` (random batches, no
I/O) and end to end from its shards, everything else identical, the modes alternated --repeat times.

    python benchmarks/entry_loop.py --entry pretrain --data data/sample run.steps=36 --window 6 --repeat 3   # CPU
    python benchmarks/entry_loop.py --entry finetune --data SHARDS finetune/configs/in1k_vit_base_1gpu.yaml \
        encoder=random data.test=SHARDS:train run.steps=40 --window 10 --out loop.json

The numbers are the loop's own (metrics.jsonl): images_per_sec, data_wait, tflops and mfu per log window (--window
steps), the first --skip windows of each run dropped, the median over the rest; provenance is the runs' run.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, print_table, write_json
from launch import run_files
from launch.metrics import read_metrics
from launch.run_record import read_record

ENTRIES = {  # script, and overrides that switch off work outside the loop's steps
    "pretrain": ("pretrain/mae.py", ["knn.enabled=false", "vis.num_images=0"]),
    "finetune": ("finetune/classify.py", []),
    "linprobe": ("finetune/linprobe.py", ["probe.cached=false"]),  # the cached path trains on features, no loader
}
MODES = {"synthetic": ["data.loader=synthetic"], "e2e": []}
WINDOW_KEYS = ("images_per_sec", "data_wait", "tflops", "mfu")
RUN_KEYS = ("world_size", "precision", "micro_batch", "grad_accum_steps", "global_batch", "flops_per_image", "git",
            "packages", "hardware")


def run_once(entry: str, config: list[str], mode: str, out_dir: Path, window: int) -> tuple[list[dict], dict]:
    """One run of the entry point: its metrics records and its run.json."""
    script, quiet = ENTRIES[entry]
    cmd = [sys.executable, script, *config, *MODES[mode], f"run.output_dir={out_dir}", f"run.log_every={window}",
           "run.save_every=0", "run.eval_every=0", "run.resume=false", "run.progress=false", "run.trackers=none",
           *quiet]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script} ({mode}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return read_metrics(out_dir / run_files.METRICS), read_record(out_dir / run_files.RUN_RECORD)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", help="a YAML config and/or key=value overrides, as for the entry point")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--data", required=True, help="data.train of both runs (the end-to-end run reads it)")
    p.add_argument("--window", type=int, default=10, help="steps per timed window (run.log_every)")
    p.add_argument("--skip", type=int, default=1, help="leading windows of each run dropped (compilation, warm-up)")
    p.add_argument("--modes", default="synthetic,e2e", help="comma list: synthetic, e2e (in this order)")
    p.add_argument("--repeat", type=int, default=1, help="run the modes this many times, alternating")
    p.add_argument("--work", default=None, help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="tessera-loop-") as tmp:
        for rep, mode in ((rep, mode) for rep in range(args.repeat) for mode in args.modes.split(",")):
            records, run = run_once(args.entry, [*args.config, f"data.train={args.data}"], mode,
                                    Path(args.work or tmp) / f"{mode}{rep}", args.window)
            windows = [{k: r.get(k) for k in ("step", "loss", *WINDOW_KEYS)} for r in records if "images_per_sec" in r]
            res = results.setdefault(mode, {"windows": [], "kept": []})
            res["windows"] += windows
            res["kept"] += windows[args.skip:] or windows[-1:]
            res.update(loss=windows[-1]["loss"] if windows else None, run={k: run.get(k) for k in RUN_KEYS})
    for mode, res in results.items():
        kept = res.pop("kept")
        res.update({k: statistics.median(v) if (v := [w[k] for w in kept if w[k] is not None]) else None
                    for k in WINDOW_KEYS}, windows_kept=len(kept))
        rows.append({**res, "mode": mode, "img_s": res["images_per_sec"], "windows": len(kept),
                     "spread": f"{min(w['images_per_sec'] for w in kept):.1f}-"
                               f"{max(w['images_per_sec'] for w in kept):.1f}"})
    if "synthetic" in results and "e2e" in results:
        results["e2e_over_synthetic"] = results["e2e"]["images_per_sec"] / results["synthetic"]["images_per_sec"]
        rows.append({"mode": "e2e / synthetic", "img_s": results["e2e_over_synthetic"]})
    print_table(rows, [("mode", ENTRIES[args.entry][0]), ("img_s", "images/s (median window)"),
                       ("windows", "windows"), ("spread", "min-max"), ("data_wait", "data wait"),
                       ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("loss", "last loss")])
    payload = {"benchmark": f"entry_loop_{args.entry}", "args": vars(args), "results": results}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
