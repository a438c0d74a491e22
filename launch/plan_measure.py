"""What `--plan` measures (launch/plan.py): the entry point's own run on synthetic batches, the training loader alone,
peak memory, and the largest micro-batch that fits.

* `run_entry(module, argv, log)`: the entry point's `main(argv)` in this process (its stdout into `log`), timed, with
  each checkpoint save timed, the moment its loop first asks for a batch, and the peak memory; with `limit` it ends
  after that many batches (`ProbeEnd`: no final checkpoint, evaluation or export).
* `window_stats(records, ...)`: the loop's own log windows (`images_per_sec`, `data_wait`, `hook_sec`) read back:
  the first window is the warm-up (compilation included when the run compiles), the others are timed.
* `time_loader(loader, ...)`: the time to the first batch and the images/s after the workers' first batches.
* `PeakMemory`: device memory on CUDA (the caching allocator's peak reserved bytes, what has to fit); on CPU the
  process's peak resident set (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere sampled
  every 10 ms with psutil).
* `largest_micro_batch(probe, ...)`: on CUDA a search (doubling, then bisection) of short probe runs; on CPU, where
  running out of memory kills the process, a straight-line fit of the peak over two probes, extrapolated.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from launch import run_files

GIB = 2**30


@dataclass
class LoaderPlace:
    """The process a loader is built for: what the entry points' loader builders read of a `Runtime`."""

    micro_batch: int
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class ProbeEnd(Exception):  # noqa: N818 - the planned end of a probe run, not an error
    """Raised when a short run has had its batches (`loop_batches(limit=...)`): it ends there, without the final
    checkpoint, evaluation or export."""


@contextlib.contextmanager
def loop_batches(limit: int | None = None) -> Iterator[list[float]]:
    """While inside: the perf_counter time at which the training loop asked for each batch (the list yielded), and
    with `limit` a `ProbeEnd` instead of batch `limit + 1`."""
    from launch.loop import TrainLoop

    real, times = TrainLoop._next_batch, []

    def counted(self):
        if limit is not None and len(times) >= limit:
            raise ProbeEnd(f"{limit} batches")
        times.append(time.perf_counter())
        return real(self)

    TrainLoop._next_batch = counted
    try:
        yield times
    finally:
        TrainLoop._next_batch = real


@contextlib.contextmanager
def timed_saves() -> Iterator[list[float]]:
    """While inside: the seconds of every checkpoint save (`Session.save`), in order."""
    from launch.session import Session

    real, times = Session.save, []

    def save(self, step, loop_state):
        t0 = time.perf_counter()
        try:
            return real(self, step, loop_state)
        finally:
            times.append(time.perf_counter() - t0)

    Session.save = save
    try:
        yield times
    finally:
        Session.save = real


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.bytes` (see the module docstring) and `peak.kind`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "device" if device.type == "cuda" else "rss"
        self.bytes: int | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.kind == "device":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_hwm():
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "device":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_reserved(self.device))
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.bytes = self._sampled
        else:
            self.bytes = _read_hwm()

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.01):
            self._sampled = max(self._sampled, proc.memory_info().rss)


def _reset_hwm() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _read_hwm() is not None
    except OSError:
        return False


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(device: torch.device) -> int:
    """What the peak must fit in: the device's memory on CUDA, the machine's memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return int(psutil.virtual_memory().total)


FIT_SHARE = 0.95  # a peak above this share of the budget does not count as fitting (fragmentation, other processes)


def fits(peak: int, budget: int) -> bool:
    return peak <= FIT_SHARE * budget


@dataclass
class EntryRun:
    wall_sec: float  # main() from call to return
    first_batch_at: float | None  # seconds from the call to the loop's first request for a batch
    records: list[dict]  # metrics.jsonl
    record: dict  # run.json
    save_sec: list[float]
    peak_bytes: int | None
    peak_kind: str


def run_entry(module, argv: list[str], run_dir: Path, log: Path, device: torch.device,
              limit: int | None = None) -> EntryRun:
    """`module.main(argv)` in this process (see the module docstring); a probe (`limit`) ends at `ProbeEnd`."""
    with (log.open("a") as out, contextlib.redirect_stdout(out), loop_batches(limit) as batches,
          timed_saves() as saves, PeakMemory(device) as peak):
        t0 = time.perf_counter()
        try:
            module.main(argv)
        except ProbeEnd:
            if limit is None:
                raise
        wall = time.perf_counter() - t0
    gc.collect()  # an ended run's frames go, and with them its loader's worker processes
    metrics = run_dir / run_files.METRICS
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    record_path = run_dir / run_files.RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    return EntryRun(wall, batches[0] - t0 if batches else None, records, record, saves, peak.bytes, peak.kind)


@dataclass
class WindowStats:
    images_per_sec: float  # the timed windows' images over their seconds
    step_sec: float  # seconds per optimizer step in the timed windows
    warmup_extra_sec: float  # the first window's seconds beyond the steady rate (compilation, allocator)
    host_wait: float  # the timed windows' data_wait (time-weighted)
    loop_sec: float  # all windows' seconds (hooks excluded)
    hook_sec: dict[int, float]  # step -> the hooks' seconds logged at that step
    timed_steps: int
    windows: list[float]  # every window's images/s, the warm-up first


def window_stats(records: list[dict], *, global_batch: int) -> WindowStats:
    """A run's log windows read back from its records (see the module docstring); `global_batch` is the images of one
    optimizer step of the process that logged them."""
    logs = [r for r in records if r.get("images_per_sec")]
    if not logs:
        raise RuntimeError("no log windows to read: metrics.jsonl holds no images_per_sec record")
    windows, prev = [], 0  # (steps, seconds, data_wait); the first is the warm-up, unless it is the only one
    for r in logs:
        windows.append((r["step"] - prev, (r["step"] - prev) * global_batch / r["images_per_sec"], r["data_wait"]))
        prev = r["step"]
    timed = windows[1:] or windows
    timed_steps, timed_sec = sum(n for n, _, _ in timed), sum(t for _, t, _ in timed)
    rate = timed_steps * global_batch / timed_sec
    wait = sum(w * t for _, t, w in timed) / timed_sec
    warm = max(0.0, windows[0][1] - windows[0][0] * global_batch / rate)
    secs = [t for _, t, _ in windows]
    hooks = {r["step"]: float(r.get("hook_sec") or 0.0) for r in logs}
    return WindowStats(rate, timed_sec / timed_steps, warm, wait, sum(secs), hooks, timed_steps,
                       [r["images_per_sec"] for r in logs])


@dataclass
class LoaderStats:
    images_per_sec: float
    first_batch_sec: float  # from the first request to the first batch (worker start-up, shard opening)
    batches: int  # timed
    workers: int


def time_loader(loader, *, seconds: float, workers: int) -> LoaderStats:
    """The loader alone: the first batch, then `workers + 1` batches untimed (each worker's first), then batches for at
    least `seconds` and at least `2 * workers + 2` of them."""
    it = iter(loader)
    try:
        t0 = time.perf_counter()
        first = next(it)
        first_sec = time.perf_counter() - t0
        size = len(first["image"])
        for _ in range(workers + 1):
            next(it)
        n, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < seconds or n < 2 * workers + 2:
            next(it)
            n += 1
        return LoaderStats(n * size / (time.perf_counter() - t1), first_sec, n, workers)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator: ends the DataLoader iterator and its workers


@dataclass
class BatchSearch:
    micro_batch: int | None  # the largest that fits (None: not even the first probe)
    method: str  # "search" (measured) or "extrapolated" (predicted)
    probes: list[tuple[int, int | None]]  # (micro-batch, peak bytes or None: out of memory)


def largest_micro_batch(probe: Callable[[int], int | None], *, start: int, budget: int, device_type: str,
                        cap: int = 65536, bisect_steps: int = 3) -> BatchSearch:
    """See the module docstring. `probe(m)` runs micro-batch `m` and returns its peak bytes, None when it ran out of
    memory."""
    probes: list[tuple[int, int | None]] = []

    def ok(m: int) -> bool:
        peak = probe(m)
        probes.append((m, peak))
        return peak is not None and fits(peak, budget)

    if device_type != "cuda":
        a, b = start, 2 * start
        pa, pb = probe(a), probe(b)
        probes += [(a, pa), (b, pb)]
        slope = (pb - pa) / (b - a) if pa is not None and pb is not None else 0
        if slope <= 0:
            return BatchSearch(None, "extrapolated", probes)
        best = int((FIT_SHARE * budget - pa) / slope) + a
        return BatchSearch(min(best, cap) if best >= 1 else None, "extrapolated", probes)
    good, bad = 0, None
    m = start
    while m <= cap:
        if not ok(m):
            bad = m
            break
        good, m = m, 2 * m
    if good == 0:  # the configured micro-batch itself does not fit: halve
        m = start // 2
        while m >= 1 and not ok(m):
            bad, m = m, m // 2
        good = max(m, 0)
    if bad is not None and good:
        for _ in range(bisect_steps):
            mid = (good + bad) // 2
            if mid in (good, bad):
                break
            if ok(mid):
                good = mid
            else:
                bad = mid
    return BatchSearch(good or None, "search", probes)


def matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """This CPU's dense matmul rate (TFLOP/s) with the process's torch threads: the best of `repeats` n^3 products
    after one warm-up (a ceiling: on a shared machine the best repeat is the least disturbed). The MFU reference for a
    CPU, which has no vendor peak in launch/hardware.py."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def machine() -> dict:
    """This machine, as the plan states it: CPU model and cores, torch threads, memory, load, the GPU if any."""
    from launch.hardware import cpu_model

    out = {"cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
           "memory_gb": round(psutil.virtual_memory().total / GIB, 1), "load_avg": list(os.getloadavg())}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports, before the entry point's main)."""
    return max(0.0, time.time() - psutil.Process().create_time())


__all__ = ["LoaderPlace", "ProbeEnd", "loop_batches", "timed_saves", "PeakMemory", "memory_budget", "fits",
           "EntryRun", "run_entry", "WindowStats", "window_stats", "LoaderStats", "time_loader", "BatchSearch",
           "largest_micro_batch", "matmul_tflops", "machine", "process_age", "FIT_SHARE", "GIB"]
