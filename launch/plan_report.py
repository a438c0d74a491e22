"""The plan's JSON (`RUN_DIR/plan.json`, format `tessera-plan/1`) and its printed form (launch/plan.py).

Every figure sits under `measured` (timed on this machine by the plan) or `predicted` (computed from measured
figures, or from FLOPs at a stated utilisation for machines that were not measured); `run` holds what the config
says (batch arithmetic, steps, epochs, evaluation and checkpoint cadence) and `machine` where the plan ran.
`measured.step` is the step alone (synthetic batches), `measured.loader` the loader alone, `measured.together` the
run's own steps fed by its loader; `predicted.bound` names what bounds the run (from `together` when it was
measured, else from the two alone) and the images/s the wall-clock uses.

    {"format": "tessera-plan/1", "entry": "pretrain/mae.py", "args": [...], "created": "...",
     "machine": {"cpu", "cpu_cores", "torch_threads", "memory_gb", "load_avg", "gpu"?},
     "run": {"device", "precision", "compile", "world_size", "micro_batch", "global_batch", "grad_accum_steps", "steps",
             "start_step", "num_samples", "epochs", "loader", "num_workers", "eval_every", "evaluations", "save_every",
             "saves", "flops_per_image"},
     "measured": {"step": {"images_per_sec", "step_sec", "warmup_extra_sec", "host_wait", "timed_steps", "windows",
                           "tflops", "mfu", "peak_tflops", "peak_source"},
                  "loader": null | {"images_per_sec", "per_core_images_per_sec", "workers", "cores",
                                    "first_batch_sec", "batches"},
                  "together": null | {"images_per_sec", "data_wait", "timed_steps", "windows"},
                  "evaluation": {"mid_sec", "end_hooks_sec"}, "checkpoint_sec", "start_sec", "end_sec",
                  "memory": {"kind": "device" | "rss", "peak_bytes", "budget_bytes", "fits"},
                  "max_micro_batch"?: {...}, "plan_sec"},
     "predicted": {"loader_in_run_images_per_sec",
                   "bound": {"by": "step" | "loader", "images_per_sec", "data_wait", "basis", "alone_by",
                             "alone_images_per_sec", "loader_over_step", "cores_to_balance"},
                   "wall_clock": {"start_sec", "steps_sec", "warmup_sec", "evaluations", "evaluation_sec",
                                  "end_hooks_sec", "saves", "save_sec", "end_sec", "total_sec"},
                   "run_tflop", "max_micro_batch"?: {...},
                   "targets": [{"name", "count", "precision", "peak_tflops", "mfu", "mfu_source", "micro_batch",
                                "global_batch", "step_images_per_sec", "loader_images_per_sec", "loader_cores",
                                "bound", "images_per_sec", "hours", "device_hours", "price_per_hour", "cost"}]},
     "notes": [...]}
"""

from __future__ import annotations

import math

FORMAT = "tessera-plan/1"
NUMBER = (int, float)
MAYBE_NUMBER = (int, float, type(None))

# section -> {key: allowed types}; `check_plan` holds a plan to it
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {"format": (str,), "entry": (str,), "args": (list,), "created": (str,), "machine": (dict,), "run": (dict,),
         "measured": (dict,), "predicted": (dict,), "notes": (list,)},
    "machine": {"cpu": (str,), "cpu_cores": (int,), "torch_threads": (int,), "memory_gb": NUMBER,
                "load_avg": (list,)},
    "run": {"device": (str,), "precision": (str,), "compile": (bool,), "world_size": (int,), "micro_batch": (int,),
            "global_batch": (int,), "grad_accum_steps": (int,), "steps": (int,), "start_step": (int,),
            "num_samples": (int, type(None)), "epochs": MAYBE_NUMBER, "loader": (str,), "num_workers": (int,),
            "eval_every": (int,), "evaluations": (int,), "save_every": (int,), "saves": (int,),
            "flops_per_image": MAYBE_NUMBER},
    "measured": {"step": (dict,), "loader": (dict, type(None)), "together": (dict, type(None)),
                 "evaluation": (dict,), "checkpoint_sec": NUMBER,
                 "start_sec": NUMBER, "end_sec": NUMBER, "memory": (dict,), "plan_sec": NUMBER},
    "measured.step": {"images_per_sec": NUMBER, "step_sec": NUMBER, "warmup_extra_sec": NUMBER, "host_wait": NUMBER,
                      "timed_steps": (int,), "windows": (list,), "tflops": MAYBE_NUMBER, "mfu": MAYBE_NUMBER,
                      "peak_tflops": MAYBE_NUMBER, "peak_source": (str, type(None))},
    "measured.loader": {"images_per_sec": NUMBER, "per_core_images_per_sec": NUMBER, "workers": (int,),
                        "cores": (int,), "first_batch_sec": NUMBER, "batches": (int,)},
    "measured.together": {"images_per_sec": NUMBER, "data_wait": NUMBER, "timed_steps": (int,), "windows": (list,)},
    "measured.evaluation": {"mid_sec": NUMBER, "end_hooks_sec": NUMBER},
    "measured.memory": {"kind": (str,), "peak_bytes": (int, type(None)), "budget_bytes": (int,),
                        "fits": (bool, type(None))},
    "predicted": {"loader_in_run_images_per_sec": MAYBE_NUMBER, "bound": (dict,), "wall_clock": (dict,),
                  "run_tflop": MAYBE_NUMBER, "targets": (list,)},
    "predicted.bound": {"by": (str,), "images_per_sec": NUMBER, "data_wait": NUMBER, "basis": (str,),
                        "alone_by": (str,), "alone_images_per_sec": NUMBER, "loader_over_step": MAYBE_NUMBER,
                        "cores_to_balance": (int, type(None))},
    "predicted.wall_clock": {"start_sec": NUMBER, "steps_sec": NUMBER, "warmup_sec": NUMBER, "evaluations": (int,),
                             "evaluation_sec": NUMBER, "end_hooks_sec": NUMBER, "saves": (int,), "save_sec": NUMBER,
                             "end_sec": NUMBER, "total_sec": NUMBER},
}
TARGET_KEYS = {"name": (str,), "count": (int,), "precision": (str,), "peak_tflops": MAYBE_NUMBER,
               "mfu": MAYBE_NUMBER, "mfu_source": (str,), "micro_batch": (int,), "global_batch": (int,),
               "step_images_per_sec": NUMBER, "loader_images_per_sec": MAYBE_NUMBER, "loader_cores": (int,),
               "bound": (str,), "images_per_sec": NUMBER, "hours": NUMBER, "device_hours": NUMBER,
               "price_per_hour": MAYBE_NUMBER, "cost": MAYBE_NUMBER}


def check_plan(plan: dict) -> list[str]:
    """What in `plan` departs from the schema (empty when it conforms): missing keys, wrong types, bad enums."""
    problems = []

    def check(obj: dict, keys: dict[str, tuple], where: str) -> None:
        for key, types in keys.items():
            if key not in obj:
                problems.append(f"{where}{key}: missing")
            elif not isinstance(obj[key], types) or (isinstance(obj[key], bool) and bool not in types):
                problems.append(f"{where}{key}: {type(obj[key]).__name__}, expected {[t.__name__ for t in types]}")
            elif isinstance(obj[key], float) and not math.isfinite(obj[key]):
                problems.append(f"{where}{key}: not finite")

    for section, keys in SCHEMA.items():
        obj = plan
        for part in filter(None, section.split(".")):
            obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is None and section in ("measured.loader", "measured.together"):
            continue
        if not isinstance(obj, dict):
            problems.append(f"{section}: missing")
            continue
        check(obj, keys, f"{section}." if section else "")
    for i, target in enumerate(plan.get("predicted", {}).get("targets", [])):
        check(target, TARGET_KEYS, f"predicted.targets[{i}].")
    if plan.get("format") != FORMAT:
        problems.append(f"format: {plan.get('format')!r}, expected {FORMAT!r}")
    if plan.get("predicted", {}).get("bound", {}).get("by") not in ("step", "loader"):
        problems.append("predicted.bound.by: expected 'step' or 'loader'")
    return problems


def duration(sec: float) -> str:
    """`2 min 31 s`, `1 h 05 min`, `12.3 s`."""
    if sec < 60:
        return f"{sec:.1f} s"
    if sec < 3600:
        return f"{int(sec // 60)} min {int(round(sec % 60)):02d} s"
    return f"{int(sec // 3600)} h {int(round(sec % 3600 / 60)):02d} min"


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render(plan: dict) -> str:
    """The plan as lines, each figure tagged [measured] or [predicted]."""
    run, m, p, mach = plan["run"], plan["measured"], plan["predicted"], plan["machine"]
    step, loader, b, wc = m["step"], m["loader"], p["bound"], p["wall_clock"]
    where = mach.get("gpu") or mach["cpu"]
    lines = [f"plan of {plan['entry']} {' '.join(plan['args'])}".rstrip(),
             f"machine     {where}; {mach['cpu_cores']} cores, {mach['torch_threads']} torch thread(s), "
             f"{mach['memory_gb']} GB; load {' '.join(f'{x:.2f}' for x in mach['load_avg'])} (timings move with it)"]
    ep = f" = {run['epochs']:.2f} epochs of {run['num_samples']:,}" if run["epochs"] is not None else ""
    left = f" (resuming at step {run['start_step']})" if run["start_step"] else ""
    lines.append(f"run         {run['steps']} steps{left} x {run['global_batch']} images (micro {run['micro_batch']} x "
                 f"{run['world_size']} process x {run['grad_accum_steps']} accumulation){ep}; {run['device']}, "
                 f"precision {run['precision']}, compile {'on' if run['compile'] else 'off'}; "
                 f"{run['evaluations']} evaluation(s) before the end (run.eval_every={run['eval_every']}), "
                 f"{run['saves']} checkpoint(s)")
    lines.append(f"step        {_rate(step['images_per_sec'])} img/s, {step['step_sec']:.3f} s/step over "
                 f"{step['timed_steps']} timed steps on synthetic batches; first steps +"
                 f"{step['warmup_extra_sec']:.1f} s (warm-up{', compilation' if run['compile'] else ''})  [measured]")
    if loader is None:
        lines.append(f"loader      none to time (data.loader={run['loader']}): the step bounds the run")
    else:
        lines.append(f"loader      {_rate(loader['images_per_sec'])} img/s alone with {loader['workers']} worker(s) "
                     f"on {loader['cores']} core(s) = {_rate(loader['per_core_images_per_sec'])} img/s per core; "
                     f"first batch after {loader['first_batch_sec']:.1f} s  [measured]")
        ratio = f", loader at {b['loader_over_step']:.1f}x the step" if b["loader_over_step"] else ""
        lines.append(f"            {_rate(p['loader_in_run_images_per_sec'])} img/s on the cores the step leaves (one "
                     f"per worker): alone, the {b['alone_by']} is the slower side{ratio}  [predicted]")
    tg = m.get("together")
    if tg is not None:
        lines.append(f"together    {_rate(tg['images_per_sec'])} img/s, data_wait {tg['data_wait']:.2f}: the run's "
                     f"steps fed by its loader, {tg['timed_steps']} timed steps  [measured]")
    more = (f"; {b['cores_to_balance']} loader cores would keep up with the step alone (data.num_workers)"
            if b["by"] == "loader" and b["cores_to_balance"] else "")
    lines.append(f"bound       the {b['by'].upper()} bounds the run: {_rate(b['images_per_sec'])} img/s "
                 f"({b['basis']}){more}; data_wait {b['data_wait']:.2f} (the share of each log window spent "
                 f"waiting for a batch: compare the run's data_wait)  [predicted]")
    ev = m["evaluation"]
    lines.append(f"evaluation  {ev['mid_sec']:.1f} s per evaluation step, {ev['end_hooks_sec']:.1f} s of hooks at the "
                 f"last step; checkpoint {m['checkpoint_sec']:.2f} s  [measured]")
    mem = m["memory"]
    what = "device memory (peak reserved)" if mem["kind"] == "device" else "peak RSS of the process"
    fit = "fits" if mem["fits"] else "DOES NOT FIT" if mem["fits"] is False else "?"
    lines.append(f"memory      {what} {_gb(mem['peak_bytes'])} of {_gb(mem['budget_bytes'])} over the steps, an "
                 f"evaluation and the export: {fit}  [measured]")
    for section, tag in (("measured", "measured"), ("predicted", "predicted")):
        search = plan[section].get("max_micro_batch")
        if search:
            how = "search" if tag == "measured" else "straight-line fit of the peak over two probes"
            probes = ", ".join(f"{mb}: {_gb(pk) if pk else 'out of memory'}" for mb, pk in search["probes"])
            lines.append(f"max batch   micro-batch {search['micro_batch']} fits ({how}: {probes})  [{tag}]")
    flops = run["flops_per_image"]
    if flops:
        mfu = (f", MFU {step['mfu']:.1%} of {step['peak_tflops']:.3g} TFLOP/s ({step['peak_source']})"
               if step["mfu"] is not None else ", MFU - (no peak known for this device)")
        lines.append(f"FLOPs       {flops / 1e9:.3f} GFLOP per training image, {p['run_tflop']:,.1f} TFLOP for the "
                     f"run; {step['tflops']:.3f} TFLOP/s at the step's rate{mfu}  [measured]")
    lines.append(f"wall-clock  {duration(wc['total_sec'])} = start {wc['start_sec']:.1f} s + steps "
                 f"{wc['steps_sec']:.1f} s + warm-up {wc['warmup_sec']:.1f} s + {wc['evaluations']} x "
                 f"{wc['evaluation_sec']:.1f} s evaluations + end hooks {wc['end_hooks_sec']:.1f} s + {wc['saves']} x "
                 f"{wc['save_sec']:.2f} s checkpoints + end {wc['end_sec']:.1f} s  [predicted]")
    for t in p["targets"]:
        cost = f", cost {t['cost']:,.3g} at {t['price_per_hour']:g} per device-hour" if t["cost"] is not None else ""
        mfu = (f" at {t['mfu']:.0%} MFU of {t['peak_tflops']:g} TFLOP/s {t['precision']} ({t['mfu_source']})"
               if t["peak_tflops"] else f" ({t['mfu_source']})")
        loader_part = (f", loader {_rate(t['loader_images_per_sec'])} img/s on {t['loader_cores']} core(s) per "
                       f"device" if t["loader_images_per_sec"] else "")
        lines.append(f"on {t['name']} x{t['count']}  step {_rate(t['step_images_per_sec'])} img/s{mfu}{loader_part}; "
                     f"{t['bound']} bound at {_rate(t['images_per_sec'])} img/s (global batch {t['global_batch']}): "
                     f"{duration(t['hours'] * 3600)} of steps and evaluations, {t['device_hours']:,.3g} "
                     f"device-hours{cost}  [predicted]")
    lines += [f"note        {n}" for n in plan["notes"]]
    return "\n".join(lines)


__all__ = ["FORMAT", "SCHEMA", "TARGET_KEYS", "check_plan", "render", "duration"]
