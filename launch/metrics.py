"""Run metrics: one JSON object per logged step in `RUN_DIR/metrics.jsonl`, mirrored to Accelerate's trackers.

Only the main process writes. Values must already be Python numbers (call `.item()` at log steps only).
The file is strict JSON (RFC 8259, `allow_nan=False`): a non-finite number (NaN, inf) is written as `null`, so any
JSON reader takes it; trackers get only the finite numbers.
On resume, `truncate_after(step)` drops lines logged after the checkpoint the run restarts from, so the file stays
one clean series (the steps after it are logged again by the resumed run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf, -inf) replaced by None, in nested dicts/lists/tuples too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsLogger:
    def __init__(self, run_dir: str | Path, accelerator: Accelerator, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append `{"step": step, **values}` to metrics.jsonl and send the numbers to the trackers."""
        if not self.accelerator.is_main_process:
            return
        record = json_safe({"step": int(step), **values})
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers = {k: v for k, v in numbers.items() if math.isfinite(v)}
        if numbers and self.accelerator.trackers:
            self.accelerator.log(numbers, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop records with `step > step` (written after the checkpoint a resumed run starts from)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():  # a damaged file loses its bad lines
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        self.accelerator.end_training()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a half-written last line is skipped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


__all__ = ["MetricsLogger", "json_safe", "read_metrics"]
