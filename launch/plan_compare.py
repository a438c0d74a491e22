"""A run against its plan: `python -m launch.plan_compare RUN_DIR [--wall SECONDS]`.

Reads `RUN_DIR/plan.json` (written by `--plan`), the run's `metrics.jsonl` and `run.json`, and prints the plan's
figures beside the run's own, in the same terms:
- images/s and `data_wait` over the run's log windows after the first (time-weighted: a window's seconds are its
  images over its images/s), against the plan's bound and predicted data_wait;
- the bound each implies: the run waited for its loader when its data_wait exceeds the step's own floor (the plan's
  `host_wait`, the share the loop counts as waiting with synthetic batches) by more than
  `launch.plan_math.LOADER_MARGIN`;
- evaluation seconds (the run's `hook_sec` at its evaluation steps) against the plan's;
- the wall-clock: `--wall` (e.g. from `/usr/bin/time`, process start to exit) against the plan's total; without it,
  run.json's start to end (the session's span: after start-up, before the process exits) against the plan's total
  less its start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from launch import run_files
from launch.metrics import read_metrics
from launch.plan_math import live_bound
from launch.plan_measure import window_stats

MIN_HOOK_SEC = 0.05  # hook seconds below this are a due hook that did nothing (the final step of a classifier run)


def live_windows(records: list[dict], global_batch: int) -> dict:
    """images/s and data_wait over the log windows after the first, time-weighted; the hooks' seconds by step."""
    ws = window_stats(records, global_batch=global_batch)
    return {"images_per_sec": ws.images_per_sec, "data_wait": ws.host_wait,
            "hook_sec": {step: sec for step, sec in ws.hook_sec.items() if sec >= MIN_HOOK_SEC}}


def span_seconds(record: dict) -> float | None:
    try:
        start = datetime.datetime.fromisoformat(record["start_time"])
        end = datetime.datetime.fromisoformat(record["end_time"])
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def compare(run_dir: Path, wall: float | None = None, plan_path: Path | None = None) -> dict:
    plan = json.loads((plan_path or run_dir / run_files.PLAN).read_text())
    record = json.loads((run_dir / run_files.RUN_RECORD).read_text())
    live = live_windows(read_metrics(run_dir / run_files.METRICS), int(record["global_batch"]))
    pred, floor = plan["predicted"], plan["measured"]["step"]["host_wait"]
    wc = pred["wall_clock"]
    by_live = live_bound(live["data_wait"], floor)
    if wall is None:
        wall_pred, wall_live, what = wc["total_sec"] - wc["start_sec"], span_seconds(record), "run.json start to end"
    else:
        wall_pred, wall_live, what = wc["total_sec"], wall, "process start to exit"
    return {"images_per_sec": (pred["bound"]["images_per_sec"], live["images_per_sec"]),
            "data_wait": (pred["bound"]["data_wait"], live["data_wait"]),
            "bound": (pred["bound"]["by"], by_live),
            "evaluation_sec": (plan["measured"]["evaluation"]["mid_sec"], live["hook_sec"]),
            "wall_sec": (wall_pred, wall_live), "wall_what": what}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--wall", type=float, default=None, help="the run's measured wall-clock seconds")
    p.add_argument("--plan", type=Path, default=None, help="the plan's JSON (default RUN_DIR/plan.json)")
    args = p.parse_args(argv)
    c = compare(args.run_dir, args.wall, args.plan)
    (ips_p, ips_l), (w_p, w_l), (b_p, b_l) = c["images_per_sec"], c["data_wait"], c["bound"]
    wall_p, wall_l = c["wall_sec"]
    print(f"images/s    plan {ips_p:,.1f}   run {ips_l:,.1f}   ({ips_l / ips_p - 1:+.0%})")
    print(f"data_wait   plan {w_p:.2f}   run {w_l:.2f}")
    print(f"bound       plan {b_p}   run {b_l}")
    print(f"evaluation  plan {c['evaluation_sec'][0]:.1f} s   run "
          f"{', '.join(f'{v:.1f} s at {k}' for k, v in c['evaluation_sec'][1].items()) or '-'}")
    if wall_l is not None:
        print(f"wall-clock  plan {wall_p:.1f} s   run {wall_l:.1f} s ({c['wall_what']}; {wall_l / wall_p - 1:+.0%})")
    return c


if __name__ == "__main__":
    main()
