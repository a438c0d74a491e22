"""Graceful stop on SIGTERM/SIGUSR1 (SLURM pre-emption, `scancel --signal`): remember the signal, let the loop
save a checkpoint at the next step boundary and exit with code 0.

The handler only sets a flag; the training loop asks `should_stop()`. With several processes the flag is combined
across ranks (any rank signalled -> all stop at the same step) by an all-reduce, which the loop does at log steps
only to avoid a synchronisation every step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Installs handlers for `signals`; `received` holds the first signal's name (or None)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self, accelerator=None) -> bool:
        """True when this process, or (with an accelerator and several processes) any process, was signalled."""
        local = self.received is not None
        if accelerator is None or accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["StopFlag", "STOP_SIGNALS"]
