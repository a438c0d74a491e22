"""Benchmark plumbing: step timing (warm-up untimed; then CUDA events or the host clock; median and min-max), FLOPs,
memory, the peak behind MFU, provenance (run.json's fields, from the same functions), and the table and JSON writers."""

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
    return {"time": utc_now(), "git": git_state(), "packages": package_versions(), "torch_threads":
            torch.get_num_threads(), "hardware": {k: v for k, v in describe().items() if k != "host"}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], None], *, steps: int, warmup: int, device: torch.device) -> dict:
    """`warmup` untimed calls of `step(i)` (their wall time, compilation included), then `steps` timed ones."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warmup_s, spans = time.perf_counter() - t0, []
    for i in range(warmup, warmup + steps):
        if device.type == "cuda":
            spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            spans[-1][0].record()
            step(i)
            spans[-1][1].record()
        else:
            s0 = time.perf_counter()
            step(i)
            spans.append((time.perf_counter() - s0) * 1e3)
    sync(device)
    ms = [a.elapsed_time(b) for a, b in spans] if device.type == "cuda" else spans
    return {"step_ms_median": statistics.median(ms), "step_ms_min": min(ms), "step_ms_max": max(ms),
            "step_ms": [round(t, 3) for t in ms], "warmup_s": warmup_s}


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(GB, what it is): CUDA max_memory_allocated since the last reset, or on CPU the process's peak resident set."""
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_process_peak_rss"  # Linux: kilobytes


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


def resolve_peak(precision: str, device: torch.device, given: float | None = None) -> dict:
    """The peak behind MFU and where it came from: `given`; on CUDA bf16, 800 TFLOP/s (measured on H100); else the
    device's data-sheet peak (launch/hardware.py; none for CPUs: no MFU then)."""
    spec = peak_tflops(device_name(device), precision)
    if given is not None:
        return {"peak_tflops": given, "peak_source": "--peak-tflops", "spec_tflops": spec}
    if device.type == "cuda" and precision == "bf16":
        return {"peak_tflops": MEASURED_BF16_TFLOPS, "peak_source": "bf16 dense, measured on H100", "spec_tflops": spec}
    return {"peak_tflops": spec, "peak_source": "data sheet" if spec else "unknown (no MFU)", "spec_tflops": spec}


def throughput(timing: dict, batch: int, train_flops_per_image: float, peak: dict) -> dict:
    """images/s from the median step, achieved TFLOP/s and MFU (analytic FLOPs over the chosen peak and the spec)."""
    ips = batch / (timing["step_ms_median"] / 1e3)
    tflops = ips * train_flops_per_image / 1e12
    mfu = {key: tflops / peak[of] if peak[of] else None for key, of in (("mfu", "peak_tflops"), ("mfu_spec",
                                                                                                 "spec_tflops"))}
    return {"images_per_sec": ips, "achieved_tflops": tflops, **mfu}


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits if abs(v) < 1 else max(digits, 4)}g}"
    return {None: "-", True: "yes", False: "no"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> str:
    """A markdown table of `rows` with (key, header) columns, printed; returns its text."""
    lines = [*([title] if title else []), "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    text = "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows])
    print(text, flush=True)
    return text


def write_json(path, payload: dict) -> Path | None:
    """`payload` as indented JSON at `path` (folders created); no path: nothing written."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"wrote {path}", flush=True)
    return Path(path) if path else None
