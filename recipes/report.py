"""Writing a recipe's results: its stored record `docs/results/NAME.json` (what the page is rendered from), and the
generated blocks of a markdown page, each between `<!-- tessera:begin NAME -->` and `<!-- tessera:end NAME -->`.
The prose around the markers is written by hand and left as it is; a block the page does not have yet is appended
at its end (move it, markers included, where it belongs). Also the number formats and the stage table the blocks
share."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

MARKER = "<!-- tessera:{} {} -->"
STAGE_HEAD = "| stage | wall-clock | command |\n|---|---:|---|"


def write_blocks(page: Path, blocks: dict[str, str]) -> Path:
    """Replace (or append) each named block of `page` with its text."""
    text = page.read_text() if page.is_file() else ""
    for name, body in blocks.items():
        begin, end = MARKER.format("begin", name), MARKER.format("end", name)
        block = f"{begin}\n{body}\n{end}"
        found = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if found.search(text):
            text = found.sub(lambda _, block=block: block, text, count=1)
        elif begin in text:
            raise ValueError(f"{page} has '{begin}' without its '{end}'")
        else:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def save_record(path: Path, record: dict) -> Path:
    """Indented JSON with every loss curve on one line, so the file stays short."""
    curves = []

    def slim(node):
        if isinstance(node, dict):
            return {k: (curves.append(v) or f"@curve{len(curves)}@") if k == "loss_curve" else slim(v)
                    for k, v in node.items()}
        return [slim(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(slim(record), indent=1)
    for i, curve in enumerate(curves, 1):
        text = text.replace(f'"@curve{i}@"', json.dumps(curve, separators=(",", ":")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def stage(record: dict, name: str) -> dict:
    """The stage of that name in a stored record ({} when it did not run)."""
    return next((s for s in record["stages"] if s["stage"] == name), {})


def fmt(x, digits: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) and not isinstance(x, bool) else f"{x}{unit}"


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_rows(record: dict) -> str:
    """The table of the stages as they ran: name, wall-clock (reused or not), command."""
    return STAGE_HEAD + "".join(f"\n| {s['stage']} | {fmt_seconds(s['seconds'])}"
                                f"{' (reused)' if s.get('reused') else ''} | `{s['command']}` |"
                                for s in record["stages"])
