"""Benchmark plumbing: step timing, FLOPs, memory and the peak rate behind MFU, the provenance a benchmark's JSON
carries (the fields of a run's run.json, from the same functions: `launch/run_record.py`, `launch/hardware.py`), and
the table and JSON writers. The real loops are timed through the entry points themselves (benchmarks/entry_loop.py).

Timing: warm-up steps untimed (compilation, allocator and library handles), then timed steps (CUDA events, or a
synchronised host clock), the median reported with min-max as the spread. Inputs are random, never zeros.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from launch.hardware import describe, device_name, peak_tflops
from launch.run_record import git_state, package_versions, utc_now

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEASURED_BF16_TFLOPS = 800.0  # H100 bf16 dense matmul as measured (REFERENCE-PERFORMANCE); the spec: launch/hardware


def provenance() -> dict:
    """When, which code and packages, on what hardware (as run.json records them), and torch's thread count."""
    hardware = {k: v for k, v in describe().items() if k != "host"}
    return {"time": utc_now(), "git": git_state(), "packages": package_versions(), "hardware": hardware,
            "torch_threads": torch.get_num_threads()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], None], *, steps: int, warmup: int, device: torch.device) -> dict:
    """`warmup` untimed then `steps` timed calls of `step(i)`: per-step ms (median, min, max, all) and the wall time
    of the first call (compilation included)."""
    sync(device)
    t0, first = time.perf_counter(), None
    for i in range(warmup):
        step(i)
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            step(warmup + i)
            b.record()
        sync(device)
        times = [a.elapsed_time(b) for a, b in events]
    else:
        times = []
        for i in range(steps):
            s0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - s0) * 1e3)
    return {"step_ms_median": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times),
            "step_ms": [round(t, 3) for t in times], "first_step_s": first if first is not None else times[0] / 1e3}


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or on CPU the process's peak resident set so far."""

    def __init__(self, device: torch.device):
        self.device, self.kind = device, ("cuda_max_memory_allocated" if device.type == "cuda" else
                                          "cpu_process_peak_rss")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: kilobytes
        self.gb = peak / 2**30


def count_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs torch's FlopCounterMode sees while `fn` runs. The CPU flash-attention kernels are not in torch's
    table (it covers the CUDA ones), so they are mapped to torch's own SDPA formulas; else attention counts zero."""
    from torch.utils import flop_counter as fc

    aten, mapping = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product: the fastest repeat after one warm-up (a ceiling:
    on a shared CPU the median would count other processes' load)."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    res = time_steps(lambda i: torch.matmul(a, b), steps=repeats, warmup=1, device=device)
    return 2 * n**3 / (res["step_ms_min"] / 1e3) / 1e12


def resolve_peak(precision: str, device: torch.device, given: float | None = None) -> dict:
    """The peak behind MFU and where it came from: `given`; on CUDA bf16, 800 TFLOP/s (measured on H100) with the
    device's data-sheet peak beside it; otherwise a matmul measured here in the step's compute dtype."""
    if given is not None:
        return {"peak_tflops": given, "peak_source": "--peak-tflops"}
    n = 8192 if device.type == "cuda" else 1024
    measured = matmul_tflops(device, PRECISIONS[precision], n)
    info = {"matmul_tflops_measured": measured, "matmul_shape": f"{n}^3 {precision}, {torch.get_num_threads()} "
                                                                f"torch thread(s)"}
    if device.type == "cuda" and precision == "bf16":
        return {**info, "peak_tflops": MEASURED_BF16_TFLOPS, "peak_source": "bf16 dense, measured on H100",
                "spec_tflops": peak_tflops(device_name(device), precision)}
    return {**info, "peak_tflops": measured, "peak_source": f"{precision} matmul measured here"}


def throughput(timing: dict, batch: int, train_flops_per_image: float, peak: dict) -> dict:
    """images/s from the median step, achieved TFLOP/s and MFU (analytic FLOPs over the chosen peak)."""
    ips = batch / (timing["step_ms_median"] / 1e3)
    tflops = ips * train_flops_per_image / 1e12
    out = {"images_per_sec": ips, "achieved_tflops": tflops, "mfu": tflops / peak["peak_tflops"]}
    if peak.get("spec_tflops"):
        out["mfu_spec"] = tflops / peak["spec_tflops"]
    return out


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits if abs(v) < 1 else max(digits, 4)}g}"
    return str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> str:
    """A markdown table of `rows` with (key, header) columns, printed; returns its text."""
    body = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    lines = ([title] if title else []) + ["| " + " | ".join(h for _, h in columns) + " |",
                                          "|" + "---|" * len(columns)]
    text = "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    print(text, flush=True)
    return text


def write_json(path, payload: dict) -> Path | None:
    """`payload` as indented JSON at `path` (folders created); no path: nothing written."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path
