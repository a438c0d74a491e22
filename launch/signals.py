"""Graceful stop on SIGTERM/SIGUSR1 (pre-emption: SLURM's time limit, `scancel`, `timeout`, torchelastic forwarding):
remember the signal, let the loop save a checkpoint at the next step boundary and exit.

The handler only sets a flag. `poll()` is asked at every step boundary; with several processes the ranks must stop at
the same step (a rank that stops while the others go on hangs them in the next collective), so the flag is combined
by an all-reduce on a small gloo group of CPU tensors: host-to-host, it never waits for the GPU. Schedulers signal every
rank of a job, but not at the same instant, hence the agreement at every step (torchelastic kills the ranks about
30 s after it forwards the signal, so waiting for a log step is too late).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised by the handler itself while `StopFlag.waiting` is set (a run still waiting for its first batch, where
    no step boundary would come to poll the flag at)."""


class StopFlag:
    """Installs handlers for `signals`; `received` holds the first signal's name (or None); `poll()` agrees."""

    def __init__(self, world_size: int = 1, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: str | None = None
        self.waiting = False  # while true, a stop signal raises StopRequested at once
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        self._group = None
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            # every rank creates the group, in the same order (a collective call)
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        if self.waiting:
            self.waiting = False
            raise StopRequested(self.received)

    def poll(self) -> str | None:
        """The signal's name when this process or (with several processes) any process was signalled, else None."""
        if self._group is None:
            return self.received
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, group=self._group)
        # a CPU tensor: `.numpy()` reads host memory, no device synchronisation involved
        return (self.received or "a signal on another rank") if int(flag.numpy()[0]) else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred(say: Callable[[str], None]) -> Iterator[list[str]]:
    """Stop signals that arrive inside are remembered, not acted on: the final export (seconds) finishes and the run
    ends normally, saying so, instead of dying half-way through writing its weights."""
    got: list[str] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        got.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, remember) for sig in STOP_SIGNALS}
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if got:
            say(f"note: {got[0]} arrived during the final export; the export was finished first and the run is "
                f"complete")


__all__ = ["StopFlag", "StopRequested", "STOP_SIGNALS", "signals_deferred"]
