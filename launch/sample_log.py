"""`data.log_samples=true`: which samples formed each optimizer step, in `RUN_DIR/samples.jsonl`.

One JSON object per step, written by the main process: `{"step": S, "positions": [...], "keys": [...]}`, the global
stream positions (data/train_stream.py: step S consumes positions `(S-1) x global ... S x global - 1`) and the
samples' keys (the WebDataset `__key__`), in position order, gathered from every rank and micro-step of the step. Two
runs with the same data and seed read the same samples per step whatever their number of processes, micro-batch,
accumulation or loader workers; comparing the files shows it. A resumed run cuts the file back to its checkpoint's
step first, so it stays one series. Costs one gather of the keys per step (a host sync): a checking tool, off by
default. Batches without keys (`data.loader=synthetic`) log positions only where they have them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import gather_object

from launch import run_files


class SampleLog:
    def __init__(self, accelerator, run_dir: Path, start_step: int):
        self.accelerator = accelerator
        self.path = Path(run_dir) / run_files.SAMPLES
        self.positions: list[int] = []
        self.keys: list[str] = []
        if accelerator.is_main_process and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    continue
            self.path.write_text("".join(line + "\n" for line in kept))

    def add(self, batch: dict) -> None:
        """One micro-batch of this rank."""
        pos = batch.get("position")
        if isinstance(pos, torch.Tensor):
            self.positions += [int(p) for p in pos.tolist()]
        keys = batch.get("key")
        if keys is not None:
            self.keys += [str(k) for k in keys]

    def end_step(self, step: int) -> None:
        """After optimizer step `step` (every rank): gather the step's samples, the main process appends them."""
        mine = [(p, k) for p, k in zip(self.positions, self.keys or [None] * len(self.positions), strict=True)]
        self.positions, self.keys = [], []
        every = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        if self.accelerator.is_main_process:
            pairs = sorted(pair for rank in every for pair in rank)
            record = {"step": step, "positions": [p for p, _ in pairs], "keys": [k for _, k in pairs]}
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_samples(run_dir: str | Path) -> dict[int, list[str]]:
    """step -> the keys of its samples (position order), from RUN_DIR/samples.jsonl."""
    out = {}
    path = Path(run_dir) / run_files.SAMPLES
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        out[record["step"]] = record["keys"]
    return out


__all__ = ["SampleLog", "read_samples"]
