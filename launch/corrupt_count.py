"""How many training images could not be decoded, over every rank and every restart of a run.

The training stream reports its rank's running count in each batch (`n_corrupt`, since the loader started); this
object adds the ranks up (an all-reduce: call `total()` at log and save steps only) and the count of earlier starts
(restored from the checkpoint, where the session saves `state_dict()`).
"""

from __future__ import annotations

import torch


class CorruptCount:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.base = 0  # counted before this start of the run
        self.rank = 0  # this rank's loader's running count since it started

    def update(self, batch: dict) -> None:
        self.rank = batch.get("n_corrupt", 0)

    def total(self) -> int:
        here = torch.tensor(float(self.rank), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            here = self.accelerator.reduce(here, reduction="sum")
        return self.base + int(here.item())

    def state_dict(self) -> dict:
        return {"n": self.total()}

    def load_state_dict(self, state: dict) -> None:
        self.base = int(state["n"])


__all__ = ["CorruptCount"]
