"""The objectives study's report writer: the record docs/results/objectives_cpu.json, a bar chart of k-NN and probe
top-1 per arm, and the study's blocks of docs/RESULTS.md, rendered from the stored record alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from recipes.page import fmt, fmt_seconds, stage_rows, write_blocks
from recipes.record import collect, commit, save_record, stage
from recipes.stages import InputError

NAME = "objectives_cpu"
STUDIES = (("objective", "Objectives"), ("augmentation", "Pretraining augmentation (MAE)"))
TABLE_HEAD = ("| arm | steps (epochs) | pretraining wall-clock | images/s | loss first -> last | k-NN top-1 (%) | "
              "probe top-1 (%) |\n|---|---:|---:|---:|---:|---:|---:|")


def write_results(header: dict, stages: list[dict], run_dirs: dict[str, Path], folders: dict[str, Path],
                  docs: Path, skip: dict[str, int]) -> dict:
    """Collect and store the record (a calibration's images/s after `skip[stage]` steps), draw, rewrite the page."""
    record = collect(header, stages, run_dirs, folders, skip)
    save_record(docs / "results" / f"{NAME}.json", record)
    render(docs)
    return record


def render(docs: Path) -> Path:
    """The chart and the page's blocks from docs/results/objectives_cpu.json."""
    if not (path := docs / "results" / f"{NAME}.json").is_file():
        raise InputError(f"{path} does not exist; run the study first")
    record = json.loads(path.read_text())
    draw_chart(record, docs / "results" / f"{NAME}.png")
    return write_blocks(docs / "RESULTS.md", blocks(record))


def arm_rows(record: dict) -> dict[str, dict]:
    """Each arm's numbers: its label, pretraining (steps, epochs, wall-clock, images/s, the mean loss of the first and
    of the last 20 logged steps, k-NN) and probe."""
    rows = {}
    for name, arm in record["arms"].items():
        pre, probe = stage(record, f"pretrain:{name}"), stage(record, f"probe:{name}")
        m = pre.get("metrics", {})
        losses = [loss for _, loss in m.get("loss_curve", [])]
        knn = m.get("knn_top1")
        rows[name] = {**arm, "steps": m.get("steps"), "epochs": m.get("epoch"), "seconds": pre.get("seconds"),
                      "images_per_sec": m.get("images_per_sec"),
                      "loss_first": statistics.fmean(losses[:20]) if losses else None,
                      "loss_last": statistics.fmean(losses[-20:]) if losses else None,
                      "knn_top1": None if knn is None else 100.0 * knn, "probe_top1": probe.get("eval", {}).get("top1")}
    return rows


def blocks(r: dict) -> dict[str, str]:
    prov, settings, rows = r["provenance"], r["settings"], arm_rows(r)
    hw, minutes = prov["hardware"], fmt(float(settings["minutes"]), 1)
    calibration = ", ".join(f"{s['stage'].split(':')[1]} {s['metrics']['images_per_sec']:.0f}" for s in r["stages"]
                            if s["stage"].startswith("calibrate:") and s.get("metrics", {}).get("images_per_sec"))
    gpus = "; ".join(g["name"] for g in hw.get("gpus", [])) or "no GPU"
    return {
        f"{NAME}:run": f"""Written by `python recipes/cifar10/objectives.py` from docs/results/{NAME}.json; do not \
edit by hand.
Run {r['started']} to {r['finished']}, total {fmt_seconds(r['total_seconds'])}, commit `{commit(r)}`. Machine: \
{hw['cpu']}, {hw['cpu_cores']} cores, {gpus},
OMP_NUM_THREADS={r.get('threads') or 'unset'}, torch {prov['packages'].get('torch')}, timm \
{prov['packages'].get('timm')}.""",
        f"{NAME}:budget": f"""**Budget.** Every arm pretrains for {minutes} minutes, the CPU budget of the chain's \
MAE pretraining, with the
chain's recipe (`pretrain/configs/cifar10_cpu.yaml`: ViT-Tiny/4, batch {settings['batch']}, lr 1e-3 cosine to 0 \
over the run,
warm-up 40 steps, one loader worker) and the ImageNet recipe's augmentation (RandomResizedCrop 0.2-1 + flip) unless
the arm says otherwise. Objectives cost different amounts per step, so a {settings['calibration_steps']}-step
calibration run of each measured its images/s on this machine (median after the first \
{settings['calibration_skip']} steps: {calibration}) and
an objective got the steps that take {minutes} minutes at its rate (MAE: {fmt(rows.get('mae', {}).get('steps'))}). \
The augmentation arms cost
what MAE costs per step and take MAE's steps. "pretraining wall-clock" is the whole `pretrain/mae.py` process
(start-up and the final k-NN included), as measured.""",
        f"{NAME}:tables": "\n\n".join([*tables(rows), finding(rows)]),
        f"{NAME}:stages": f"Command: `{r['command']}`. Stages as they ran (from the repository root; WORK and "
                          f"CIFAR_DIR stand for the run's --work and --cifar-dir):\n\n{stage_rows(r)}"}


def tables(rows: dict) -> list[str]:
    """One table per study, the best k-NN and probe top-1 of each in bold."""
    out = []
    for study, title in STUDIES:
        group = [a for a in rows.values() if study in a["studies"]]
        best = {k: max((a[k] for a in group if a[k] is not None), default=None) for k in ("knn_top1", "probe_top1")}

        def cell(a, key, best=best):
            return f"**{fmt(a[key])}**" if a[key] is not None and a[key] == best[key] else fmt(a[key])

        lines = []
        for a in group:
            steps = "–" if a["steps"] == 1 else f"{fmt(a['steps'])} ({fmt(a['epochs'])})"
            loss = f"{fmt(a['loss_first'], 3)} -> {fmt(a['loss_last'], 3)}" if (a["steps"] or 0) > 1 else "–"
            lines.append(f"| {a['label']} | {steps} | {fmt_seconds(a['seconds'])} | {fmt(a['images_per_sec'], 0)} | "
                         f"{loss} | {cell(a, 'knn_top1')} | {cell(a, 'probe_top1')} |")
        if lines:
            out.append(f"**{title}.**\n\n{TABLE_HEAD}\n" + "\n".join(lines))
    return out


def finding(rows: dict) -> str:
    """The ranking as measured, in words: each study's order by probe and by k-NN, and the random encoder's value."""
    lines, random = [], rows.get("random", {})
    for study, title in STUDIES:
        group = [a for name, a in rows.items() if study in a["studies"] and name != "random"]
        for key, what in (("probe_top1", "linear probe"), ("knn_top1", "k-NN")):
            ranked = sorted((a for a in group if a[key] is not None), key=lambda a: -a[key])
            vs = f"; the random encoder: {fmt(random[key])}" if random.get(key) is not None else ""
            order = " > ".join(f"{a['short']} {fmt(a[key])}" for a in ranked)
            if ranked:
                lines.append(f"- {title}, {what}: {order}{vs}.")
    return "**As measured.**\n\n" + "\n".join(lines) if lines else ""


def draw_chart(record: dict, path: Path) -> Path:
    """Grouped horizontal bars: k-NN and linear-probe top-1 per arm, the random encoder's probe as a dashed line."""
    arms = list(arm_rows(record).values())
    fig = Figure(figsize=(9, 0.55 * len(arms) + 1.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(arms))
    for offset, key, label, colour in ((-0.2, "knn_top1", "k-NN top-1", "#9ecae1"),
                                       (0.2, "probe_top1", "linear probe top-1", "#3182bd")):
        values = [a[key] or 0.0 for a in arms]
        ax.barh(y + offset, values, height=0.4, label=label, color=colour)
        for yi, v in zip(y + offset, values):
            ax.text(v + 0.3, yi, f"{v:.1f}", va="center", fontsize=8)
    if random := arm_rows(record).get("random", {}).get("probe_top1"):
        ax.axvline(random, color="#888888", linestyle="--", linewidth=1, label="random encoder, probe")
    ax.set_yticks(y, [a["label"] for a in arms], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([a[k] or 0.0 for a in arms for k in ("knn_top1", "probe_top1")] + [1.0]) * 1.12)
    ax.set_xlabel("CIFAR-10 test top-1 (%)")
    ax.set_title(f"Equal pretraining wall-clock ({record['settings']['minutes']:g} min each, CPU), ViT-Tiny/4",
                 fontsize=10)
    fig.legend(loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
