"""The k-NN curve of a pretraining run as a PNG: `knn_top1` against the step, with the two baselines of the k-NN
monitor (the encoder at initialisation, raw pixels) as labelled horizontal lines.

    from pictures.knn_curve import save_knn_curve_of_run
    save_knn_curve_of_run("runs/pretrain")            # -> runs/pretrain/knn_curve.png

Built on `matplotlib.figure.Figure` (rendered by the Agg canvas), so no pyplot state or GUI backend is involved.
A run without any `knn_top1` record (the monitor off) has no curve: `NoKnnRecords`, a one-line user error naming
the metrics file. A missing baseline is left out of the picture (and of the legend); a single record is drawn as one
marker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from core.errors import UserError
from launch import run_files
from launch.knn_monitor import BASELINE_KEYS, PIXEL_POOL
from launch.metrics import read_metrics

SIZE_PX, DPI = (900, 540), 100
CURVE_COLOUR = "#1f77b4"
BASELINE_STYLE = {"knn_top1_init": ("#d62728", "--", "encoder at init"),
                  "knn_top1_pixels": ("#7f7f7f", ":", f"raw pixels ({PIXEL_POOL}x{PIXEL_POOL} average-pooled)")}


class NoKnnRecords(UserError):
    """The metrics hold no finite `knn_top1`: nothing to draw."""


def knn_points(records: list[dict]) -> list[tuple[int, float]]:
    """(step, knn_top1) of every record with a finite knn_top1, by step."""
    pts = [(int(r["step"]), float(r["knn_top1"])) for r in records
           if isinstance(r.get("knn_top1"), (int, float)) and math.isfinite(r["knn_top1"]) and "step" in r]
    return sorted(pts)


def baselines_in(records: list[dict]) -> dict:
    """The baselines logged in the records (the pretraining run logs them once), the last value of each."""
    found = {}
    for r in records:
        found.update({k: r[k] for k in BASELINE_KEYS if isinstance(r.get(k), (int, float))})
    return found


def knn_figure(records: list[dict], baselines: dict | None = None, title: str = "k-NN top-1 during pretraining",
               source: str = "the metrics records") -> Figure:
    """A figure of the records' knn_top1 against the step (line with markers) and the baselines (`knn_top1_init`,
    `knn_top1_pixels`; None: those logged in the records; a missing or None value is not drawn)."""
    pts = knn_points(records)
    if not pts:
        raise NoKnnRecords(f"{source} hold no knn_top1 (was the k-NN monitor off? knn.enabled, labelled splits)")
    base = baselines_in(records) if baselines is None else baselines
    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="optimizer step", ylabel="k-NN top-1 (fraction of queries)")
    steps, values = zip(*pts)
    ax.plot(steps, values, "-o", color=CURVE_COLOUR, linewidth=2, markersize=6, label="knn_top1 (the run)")
    for key in BASELINE_KEYS:
        value = base.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            colour, style, label = BASELINE_STYLE[key]
            ax.axhline(value, color=colour, linestyle=style, linewidth=1.5, label=f"{label}: {value:.3f}")
    ax.set_xlim(left=0, right=max(steps) * 1.05 if max(steps) > 0 else 1)
    ax.grid(True, color="#e4e4e4")
    ax.legend(loc="best", frameon=True, framealpha=0.9)  # where it hides the fewest points
    return fig


def save_knn_curve(records: list[dict], path: str | Path, baselines: dict | None = None, **labels) -> Path:
    """`knn_figure(records, baselines, **labels)` written to `path` as a 900 x 540 PNG."""
    path = Path(path)
    fig = knn_figure(records, baselines, **labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def run_baselines(run_dir: str | Path, records: list[dict]) -> dict:
    """The baselines of a run: its knn_baselines.json's values, else those logged in its records."""
    baselines = baselines_in(records)
    try:
        blob = json.loads((Path(run_dir) / run_files.KNN_BASELINES).read_text())
        baselines.update({k: blob[k] for k in BASELINE_KEYS if isinstance(blob.get(k), (int, float))})
    except (OSError, ValueError, AttributeError):  # no cache file (or not ours): the records' own values, if any
        pass
    return baselines


def save_knn_curve_of_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """The curve of a run directory: its metrics.jsonl and `run_baselines`, written to `path` (default
    `RUN_DIR/knn_curve.png`)."""
    run_dir = Path(run_dir)
    metrics = run_dir / run_files.METRICS
    records = read_metrics(metrics)
    return save_knn_curve(records, path or run_dir / run_files.KNN_CURVE, run_baselines(run_dir, records),
                          source=str(metrics))


__all__ = ["NoKnnRecords", "knn_points", "baselines_in", "knn_figure", "save_knn_curve", "run_baselines",
           "save_knn_curve_of_run"]
