"""The objectives study's outputs: docs/results/objectives_cpu.json, a bar chart of k-NN and probe top-1 per arm
(matplotlib), docs/results/objectives_cpu.md rendered from the JSON, then docs/RESULTS.md rebuilt (it appends every
docs/results/*.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from recipes.cifar10.results_doc import fmt, fmt_seconds, render, write_results_md

NAME = "objectives_cpu"
STUDIES = (("objective", "Objectives"), ("augmentation", "Pretraining augmentation (MAE)"))


def write_study(result: dict, docs: Path) -> Path:
    out = docs / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(dump(result))
    draw_chart(result, out / f"{NAME}.png")
    (out / f"{NAME}.md").write_text(study_section(result) + "\n")
    path = write_results_md(docs)
    print(f"[objectives] wrote {out / (NAME + '.json')}, {out / (NAME + '.md')} and {path}", flush=True)
    return path


def dump(result: dict) -> str:
    """Indented JSON with every loss curve on one line, so the file stays short."""
    curves = {k: a.get("loss_curve") for k, a in result["arms"].items()}
    slim = {**result, "arms": {k: {**a, "loss_curve": f"@{k}@"} for k, a in result["arms"].items()}}
    text = json.dumps(slim, indent=1)
    for k, curve in curves.items():
        text = text.replace(f'"@{k}@"', json.dumps(curve, separators=(",", ":")))
    return text + "\n"


def draw_chart(result: dict, path: Path) -> Path:
    """Grouped horizontal bars: k-NN and linear-probe top-1 per arm, the random encoder's probe as a dashed line."""
    arms = list(result["arms"].items())
    fig = Figure(figsize=(9, 0.55 * len(arms) + 1.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(arms))
    for offset, key, label, colour in ((-0.2, "knn_top1", "k-NN top-1", "#9ecae1"),
                                       (0.2, "probe_top1", "linear probe top-1", "#3182bd")):
        values = [a.get(key) or 0.0 for _, a in arms]
        ax.barh(y + offset, values, height=0.4, label=label, color=colour)
        for yi, v in zip(y + offset, values, strict=True):
            ax.text(v + 0.3, yi, f"{v:.1f}", va="center", fontsize=8)
    random = result["arms"].get("random", {}).get("probe_top1")
    if random:
        ax.axvline(random, color="#888888", linestyle="--", linewidth=1, label="random encoder, probe")
    ax.set_yticks(y, [a["label"] for _, a in arms], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([a.get(k) or 0.0 for _, a in arms for k in ("knn_top1", "probe_top1")] + [1.0]) * 1.12)
    ax.set_xlabel("CIFAR-10 test top-1 (%)")
    ax.set_title(f"Equal pretraining wall-clock ({result['minutes']:g} min each, CPU), ViT-Tiny/4", fontsize=10)
    fig.legend(loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    fig.savefig(path, format="png")
    return path


def arm_row(a: dict, best: dict) -> str:
    def bold(key, text):
        return f"**{text}**" if a.get(key) is not None and a.get(key) == best.get(key) else text
    steps = "–" if a["steps"] == 1 else f"{fmt(a['steps'])} ({fmt(a['epochs'])})"
    loss = f"{fmt(a['loss_first'], 3)} -> {fmt(a['loss_last'], 3)}" if a["steps"] and a["steps"] > 1 else "–"
    return (f"| {a['label']} | {steps} | {fmt_seconds(a['pretrain_seconds'])} | {fmt(a['median_images_per_sec'], 0)} | "
            f"{loss} | {bold('knn_top1', fmt(a['knn_top1']))} | {bold('probe_top1', fmt(a['probe_top1']))} |")


def study_section(r: dict) -> str:
    tables = []
    for study, title in STUDIES:
        arms = {k: a for k, a in r["arms"].items() if study in a["studies"]}
        if not arms:
            continue
        best = {key: max((a[key] for a in arms.values() if a.get(key) is not None), default=None)
                for key in ("knn_top1", "probe_top1")}
        rows = "\n".join(arm_row(a, best) for a in arms.values())
        tables.append(f"**{title}.**\n\n" + render("objectives_table", rows=rows))
    hw = r["hardware"]
    calib = ", ".join(f"{k} {v:.0f}" for k, v in r["calibration"]["images_per_sec"].items() if v)
    commands = "\n".join(f"| {s['stage']} | {fmt_seconds(s['seconds'])}{' (reused)' if s.get('reused') else ''} | "
                         f"`{s['command']}` |" for s in r["stages"])
    return render("objectives", started=r["started"], finished=r["finished"],
                  total_time=fmt_seconds(r["total_seconds"]), commit=r.get("git_commit") or "?", cpu=hw["cpu"],
                  cpu_cores=hw["cpu_cores"], threads=hw.get("threads") or "unset", torch=hw["versions"].get("torch"),
                  timm=hw["versions"].get("timm"), minutes=fmt(float(r["minutes"]), 1), batch=r["batch"],
                  mae_steps=fmt(r["arms"].get("mae", {}).get("steps")),
                  calibration_steps=r["calibration"]["steps"], calibration=calib, tables="\n\n".join(tables),
                  command=r["command"], stage_rows=commands, chart=f"{NAME}.png", finding=finding(r["arms"]))


def finding(arms: dict) -> str:
    """The ranking as measured, in words: each study's order by probe and by k-NN, and the margins to the runner-up
    and to the random encoder."""
    lines = []
    random = arms.get("random", {})
    for study, title in STUDIES:
        group = {k: a for k, a in arms.items() if study in a["studies"] and k != "random"}
        for key, what in (("probe_top1", "linear probe"), ("knn_top1", "k-NN")):
            ranked = sorted((a for a in group.values() if a.get(key) is not None), key=lambda a: -a[key])
            if not ranked:
                continue
            order = " > ".join(f"{a['short']} {fmt(a[key])}" for a in ranked)
            vs = f"; the random encoder: {fmt(random[key])}" if random.get(key) is not None else ""
            lines.append(f"- {title}, {what}: {order}{vs}.")
    return "**As measured.**\n\n" + "\n".join(lines) if lines else ""
