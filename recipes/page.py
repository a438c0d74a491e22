"""The generated blocks of a results page, between `<!-- tessera:begin NAME -->` and `<!-- tessera:end NAME -->` (the
prose around them is written by hand), and the number formats and stage table the blocks share."""

from __future__ import annotations

import math
import re
from pathlib import Path

MARKER = "<!-- tessera:{} {} -->"


def write_blocks(page: Path, blocks: dict[str, str]) -> Path:
    """Replace (or append) each named block of `page` with its text."""
    text = page.read_text() if page.is_file() else ""
    for name, body in blocks.items():
        begin, end = MARKER.format("begin", name), MARKER.format("end", name)
        block, found = f"{begin}\n{body}\n{end}", re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if found.search(text):
            text = found.sub(lambda _, block=block: block, text, count=1)
        elif begin in text:
            raise ValueError(f"{page} has '{begin}' without its '{end}'")
        else:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def fmt(x, digits: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) and not isinstance(x, bool) else f"{x}{unit}"


def fmt_seconds(s) -> str:
    return "–" if s is None else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_rows(record: dict) -> str:
    """The table of the stages as they ran: name, wall-clock (reused or not), command."""
    return "| stage | wall-clock | command |\n|---|---:|---|" + "".join(
        f"\n| {s['stage']} | {fmt_seconds(s['seconds'])}{' (reused)' if s.get('reused') else ''} | `{s['command']}` |"
        for s in record["stages"])
