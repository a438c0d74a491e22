"""The pretraining loss curve as a PNG line chart drawn with PIL: round ticks, grid, axis labels, the raw values and a
centred moving average. Pure functions of their arguments (the only side effect is the PNG written)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


# A line chart by hand with PIL: matplotlib is not a dependency, and no kept library draws charts with PIL alone.


def nice_step(span: float, target_ticks: int = 6) -> float:
    """A tick spacing of 1, 2 or 5 times a power of ten giving about `target_ticks` intervals over `span`."""
    if not span > 0:
        return 1.0
    raw = span / max(1, target_ticks)
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * power * (1 + 1e-9):
            return m * power
    return 10.0 * power


def nice_ticks(lo: float, hi: float, target_ticks: int = 6) -> list[float]:
    """Round tick positions covering [lo, hi]: multiples of `nice_step` from floor(lo) to ceil(hi)."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target_ticks)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(v: float, step: float) -> str:
    if step >= 1 and abs(v - round(v)) < 1e-9:
        return f"{int(round(v)):,}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{decimals}f}"


def moving_average(ys: list[float], half: int) -> list[float]:
    """Centred mean over ys[i-half : i+half+1], cut at the ends (no lag, unlike a trailing mean)."""
    prefix = [0.0]
    for y in ys:
        prefix.append(prefix[-1] + y)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_loss_curve(points: list[list[float]], path: Path, title: str = "", xlabel: str = "optimizer step",
                    ylabel: str = "reconstruction loss (MSE on masked patches)", size=(900, 540)) -> Path:
    """A PNG line chart of (step, loss) points: axes, round ticks, grid, labels, raw values and a moving average."""
    w, h = size
    left, right, top, bottom = 92, 24, 46, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(13)
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(float(y))]
    d.text((left, 14), title, fill="black", font=font)
    x0, y0, x1, y1 = left, top, w - right, h - bottom  # plot area
    if not pts:
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0 + 20, (y0 + y1) // 2), "no loss values logged", fill="black", font=font)
        img.save(path)
        return path
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(min(0.0, min(xs)), max(xs), 8)
    yt = nice_ticks(min(ys), max(ys), 6)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    xstep, ystep = (xt[1] - xt[0]) if len(xt) > 1 else 1.0, (yt[1] - yt[0]) if len(yt) > 1 else 1.0
    for x in xt:
        d.line([(px(x), y0), (px(x), y1)], fill=(228, 228, 228))
        d.line([(px(x), y1), (px(x), y1 + 5)], fill="black")
        label = tick_label(x, xstep)
        tw = d.textlength(label, font=small)
        d.text((px(x) - tw / 2, y1 + 8), label, fill="black", font=small)
    for y in yt:
        d.line([(x0, py(y)), (x1, py(y))], fill=(228, 228, 228))
        d.line([(x0 - 5, py(y)), (x0, py(y))], fill="black")
        label = tick_label(y, ystep)
        tw = d.textlength(label, font=small)
        d.text((x0 - 9 - tw, py(y) - 8), label, fill="black", font=small)
    d.rectangle([x0, y0, x1, y1], outline="black")
    tw = d.textlength(xlabel, font=font)
    d.text(((x0 + x1) / 2 - tw / 2, h - 30), xlabel, fill="black", font=font)
    vertical = Image.new("RGBA", (int(d.textlength(ylabel, font=font)) + 4, 22), (255, 255, 255, 0))
    ImageDraw.Draw(vertical).text((2, 0), ylabel, fill="black", font=font)
    vertical = vertical.rotate(90, expand=True)
    img.paste(vertical, (8, int((y0 + y1) / 2 - vertical.height / 2)), vertical)

    raw = [(px(x), py(y)) for x, y in pts]
    half = len(pts) // 80
    window = 2 * half + 1
    smooth = [(px(x), py(y)) for x, y in zip(xs, moving_average(ys, half))]
    if len(raw) == 1:
        cx, cy = raw[0]
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(31, 119, 180))
    else:
        d.line(raw, fill=(160, 196, 228), width=1)
        d.line(smooth, fill=(31, 119, 180), width=2)
    legend = f"per logged step (light), centred mean of {window} (dark)" if window > 1 else "per logged step"
    tw = d.textlength(legend, font=small)
    d.text((x1 - tw - 8, y0 + 6), legend, fill=(60, 60, 60), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path
