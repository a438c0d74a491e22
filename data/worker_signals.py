"""DataLoader workers survive the stop signals (SIGTERM, SIGUSR1) sent to a process group, so pre-emption reaches
only the training process.

Schedulers and launchers deliver the stop signal to many processes at once: `timeout`, `kill -- -PGID`, SLURM (every
process of the job step) and torchelastic (`accelerate launch`, torchrun: `killpg` of each rank's group). A
DataLoader worker is among them; with the default action it dies, and the rank then fails with "DataLoader worker
... is killed by signal" instead of finishing its step and saving a checkpoint. So each worker, at start
(`worker_init_fn`):
* ignores SIGUSR1;
* blocks SIGTERM and waits for it in a small thread (`sigwaitinfo`, which tells who sent it): a SIGTERM from the
  worker's own rank is the DataLoader shutting its workers down (`Process.terminate()`, also at interpreter exit) and
  ends the worker as before; a SIGTERM from anyone else (launcher, scheduler, shell) is ignored, and the rank's own
  handler (launch/signals.py) asks the loop to stop. A plain SIG_IGN would make `terminate()` a no-op and hang the
  rank's exit whenever a worker is still running then.
The workers are forked with both signals blocked (`stop_signals_blocked` around the loader's `iter`), so one that
arrives before `worker_init_fn` has run waits for it instead of ending the worker with the default action; the rank
gets any such signal of its own as soon as its mask is restored. A worker still dies from SIGKILL, and by itself
when its rank is gone (the DataLoader's parent watchdog). Processes a worker starts (`pipe:` shard URLs) inherit the
ignored SIGUSR1 and the blocked SIGTERM, so a shard download in flight is not cut short by the stop signal either.
Written by hand: neither torch nor webdataset offers this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _terminate_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:  # the rank shuts this worker down: end as the default SIGTERM action would
            os._exit(128 + signal.SIGTERM)


def _no_op(signum, frame) -> None:
    """Handler of last resort, for a thread that has SIGTERM unblocked (the signal is then lost, harmlessly)."""


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """`worker_init_fn` body: survive SIGTERM/SIGUSR1 from others; SIGTERM from the parent (the rank) still ends it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _no_op)  # not SIG_IGN, which could discard the signal before sigwaitinfo sees it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_terminate_on_parent_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-rank").start()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGUSR1 in the calling thread for the body (the DataLoader forking its workers): processes
    started meanwhile inherit the block, so a stop signal sent to the group then stays pending until the worker has
    set up its handling (`ignore_stop_signals`); the caller's own pending signals arrive when its mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init(chained: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A `worker_init_fn` that protects the worker from the stop signals, then runs `chained(worker_id)` (an existing
    init function)."""
    if chained is None:
        return ignore_stop_signals
    return _Chained(chained)


class _Chained:
    """Picklable (for the spawn start method) pair of `ignore_stop_signals` and another init function."""

    def __init__(self, chained: Callable[[int], None]):
        self.chained = chained

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        self.chained(worker_id)


__all__ = ["STOP_SIGNALS", "ignore_stop_signals", "stop_signals_blocked", "worker_init"]
