"""The pretraining loss curve as a PNG (matplotlib, no pyplot state): the logged values and their centred mean."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

SIZE_PX, DPI = (900, 540), 100
RAW_COLOUR, SMOOTH_COLOUR = "#a0c4e4", "#1f77b4"


def moving_average(ys, half: int) -> np.ndarray:
    """Centred mean over ys[i-half : i+half+1], cut at the ends (no lag, unlike a trailing mean)."""
    ys = np.asarray(ys, dtype=np.float64)
    kernel = np.ones(2 * max(0, min(half, (len(ys) - 1) // 2)) + 1)
    return np.convolve(ys, kernel, mode="same") / np.convolve(np.ones_like(ys), kernel, mode="same")


def loss_figure(points, title: str = "", xlabel: str = "optimizer step",
                ylabel: str = "reconstruction loss (MSE on masked patches)") -> Figure:
    """The (step, loss) points (non-finite ones left out) and their centred mean over about 1/40 of the run."""
    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(float(y))]
    if not pts:
        ax.text(0.5, 0.5, "no loss values logged", transform=ax.transAxes, ha="center", va="center")
        return fig
    (xs, ys), half = np.array(pts).T, len(pts) // 80
    if len(pts) == 1:
        ax.plot(xs, ys, "o", color=SMOOTH_COLOUR, label="logged step")
    else:
        ax.plot(xs, ys, color=RAW_COLOUR, linewidth=1, label="per logged step")
    if half:
        ax.plot(xs, moving_average(ys, half), color=SMOOTH_COLOUR, linewidth=2, label=f"centred mean of {2 * half + 1}")
    ax.set_xlim(left=min(0.0, xs.min()))
    ax.grid(True, color="#e4e4e4")
    ax.legend(loc="upper right", frameon=False)
    return fig


def draw_loss_curve(points, path: Path, **labels) -> Path:
    """`loss_figure(points, **labels)` written to `path` as a 900x540 PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_figure(points, **labels).savefig(path, format="png")
    return path
