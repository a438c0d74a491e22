"""Benchmark plumbing: timing, FLOPs and memory (plus the CLI options, machine facts and table/JSON writers that
report them). No training step lives here: the step benchmarks time the shared loop (benchmarks/loop_timing.py)
and the real entry points (benchmarks/entry_loop.py).

Timing method (docs: /work/.library/device/METHOD.md): warm-up first (compilation, allocator and cuDNN/cuBLAS
handle creation stay out of the numbers), then timed windows (CUDA events or a synchronised host clock) with the
median reported and min/max as the spread. Inputs are random normals (never zeros), rotated over a few sets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --precision -> run.precision
# docs/REFERENCE-PERFORMANCE.md: bf16 dense matmul measured on H100 ~800 TFLOP/s (spec 989).
H100_BF16_MEASURED_TFLOPS = 800.0
H100_BF16_SPEC_TFLOPS = 989.0


# ----------------------------------------------------------------------------------------------------- CLI


def add_common_args(p: argparse.ArgumentParser, *, variant: str, batch: int) -> argparse.ArgumentParser:
    """The options every benchmark shares."""
    p.add_argument("--variant", default=variant, help="MAE variant name (models/variants.py)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor overrides for the variant, e.g. depth=2 decoder_depth=1 img_size=64")
    p.add_argument("--batch", type=int, default=batch, help="images per step")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="fp32, or bf16/fp16 autocast over fp32 weights (Accelerate's mixed precision)")
    p.add_argument("--compile", action="store_true", help="compile each transformer block (models/compile.py)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, a multiple of --window")
    p.add_argument("--window", type=int, default=1, help="steps per timed window (median window reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first also compiles)")
    p.add_argument("--device", default="auto", help="auto, or the device Accelerate picks (cuda, cpu) as a check")
    p.add_argument("--no-sdpa", action="store_true",
                   help="attention in math mode: timm Attention.fused_attn=False (HF: attn_implementation=eager)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (model.set_grad_checkpointing)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for MFU, in TFLOP/s; default 800 on CUDA bf16/fp16 (H100, measured in the "
                        "reference), else a large matmul measured here in the model's base dtype (fp32)")
    p.add_argument("--input-sets", type=int, default=2, help="random input batches rotated over the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--tag", default="", help="free-form label stored with the results")
    return p


def parse_overrides(items: list[str]) -> dict:
    """['depth=2', 'norm_pix_loss=true', 'mlp_ratio=2.5'] -> typed dict (int, float, bool, else str)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--override expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        low = raw.lower()
        if low in ("true", "false"):
            val = low == "true"
        else:
            try:
                val = int(raw)
            except ValueError:
                try:
                    val = float(raw)
                except ValueError:
                    val = raw
        out[key.strip()] = val
    return out


def check_args(args) -> None:
    for name in ("batch", "steps", "input_sets", "warmup", "window"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.window:
        raise SystemExit(f"--steps ({args.steps}) must be a multiple of --window ({args.window})")


def check_device(name: str, device: torch.device) -> torch.device:
    """The device Accelerate chose, checked against --device (auto accepts it)."""
    if name != "auto" and torch.device(name).type != device.type:
        raise SystemExit(f"--device {name}: the run would use {device} (Accelerate picks CUDA when present; "
                         f"hide GPUs with CUDA_VISIBLE_DEVICES= for a CPU run)")
    return device


# ------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], None], *, steps: int, warmup: int, device: torch.device) -> dict:
    """Run `warmup` untimed then `steps` timed calls of `step(i)`; per-step times in ms and their median.

    `first_step_s` is the wall time of the very first call (it includes torch.compile's compilation).
    `window_s` is the wall time of all timed steps together (one synchronize before and after).
    """
    sync(device)
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        step(i)
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    times: list[float] = []
    w0 = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            step(warmup + i)
            b.record()
        sync(device)
        times = [a.elapsed_time(b) for a, b in events]
    else:
        for i in range(steps):
            s0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - s0) * 1e3)
    window = time.perf_counter() - w0
    if first is None:  # no warm-up: the first timed step was the first call
        first = times[0] / 1e3
    return {"step_ms_median": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times),
            "step_ms": [round(t, 3) for t in times], "window_s": window, "first_step_s": first}


class PeakMemory:
    """Peak memory over a region: CUDA max_memory_allocated, or on CPU the process RSS sampled every 5 ms by a
    background thread (resident set size, so it includes the Python/torch runtime, not only tensors)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = None

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())
        return False

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_rss_peak"


def release(device: torch.device) -> None:
    """Free cached memory between two models timed in one process."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs torch's FlopCounterMode sees while `fn` runs (matmuls, convolutions, attention).

    The CPU flash-attention kernels are not in torch's table (it covers the CUDA ones), so they are mapped here to
    torch's own SDPA formulas; otherwise attention would silently count zero on CPU.
    """
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product: the fastest of `repeats` after one warm-up
    (a ceiling, so the best repeat; on a shared CPU the median would count other processes' load), rotating over
    two random input pairs."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(n, n, generator=g).to(device, dtype), torch.randn(n, n, generator=g).to(device, dtype))
             for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)

    def step(i):
        a, b = pairs[i % 2]
        torch.matmul(a, b, out=out)

    res = time_steps(step, steps=repeats, warmup=1, device=device)
    return 2 * n**3 / (res["step_ms_min"] / 1e3) / 1e12


def resolve_peak(args, device: torch.device) -> dict:
    """The peak used for MFU, where it came from, and the measured matmul rate in the step's compute dtype.

    CUDA bf16/fp16: 800 TFLOP/s (H100 bf16 dense as measured in REFERENCE-PERFORMANCE; spec 989 kept for a second
    MFU) unless --peak-tflops. Otherwise (CPU, or fp32): a large matmul measured here in the compute dtype (fp32
    for fp32; bf16/fp16 for autocast, since a CPU with AVX512-BF16 multiplies bf16 several times faster).
    """
    if args.peak_tflops is not None:  # given: nothing measured
        return {"peak_tflops": args.peak_tflops, "peak_source": "--peak-tflops"}
    compute = PRECISIONS[args.precision]
    n = None if device.type == "cuda" else 1024
    measured = matmul_tflops(device, compute, n=n, repeats=10)
    info: dict = {"matmul_dtype": args.precision, "matmul_tflops_measured": measured,
                  "matmul_shape": f"{n or 8192}^3, {torch.get_num_threads()} torch thread(s)"}
    if device.type == "cuda" and args.precision in ("bf16", "fp16"):
        info.update(peak_tflops=H100_BF16_MEASURED_TFLOPS, spec_tflops=H100_BF16_SPEC_TFLOPS,
                    peak_source="bf16 dense 800 TFLOP/s (H100, measured in REFERENCE-PERFORMANCE)")
    else:
        info.update(peak_tflops=measured, peak_source=f"{args.precision} matmul measured here")
    return info


def throughput(timing: dict, batch: int, train_flops_per_image: float, peak: dict) -> dict:
    """images/s from the median step, achieved TFLOP/s and MFU (analytic FLOPs over the chosen peak)."""
    ips = batch / (timing["step_ms_median"] / 1e3)
    tflops = ips * train_flops_per_image / 1e12
    out = {"images_per_sec": ips, "achieved_tflops": tflops, "mfu": tflops / peak["peak_tflops"]}
    if "spec_tflops" in peak:
        out["mfu_spec"] = tflops / peak["spec_tflops"]
    return out


# ------------------------------------------------------------------------------------------ machine, output


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _lscpu() -> dict:
    """The lscpu lines that matter for a loader (model, sockets, cores, threads, NUMA, caches)."""
    keep = ("Model name", "Socket(s)", "Core(s) per socket", "Thread(s) per core", "CPU(s)", "NUMA node(s)",
            "L2 cache", "L3 cache", "CPU max MHz")
    text = _run(["lscpu"]) or ""
    pairs = (line.partition(":") for line in text.splitlines())
    return {k.strip(): v.strip() for k, _, v in pairs if k.strip() in keep}


def _mem_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None


def machine_facts() -> dict:
    """What bounds a loader and a step on this host: cores usable here, lscpu, RAM, /dev/shm, GPUs (nvidia-smi)."""
    import shutil

    facts = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
             "cpu_count": os.cpu_count(), "lscpu": _lscpu(), "mem_total_gb": _mem_gb()}
    try:
        facts["dev_shm_gb"] = shutil.disk_usage("/dev/shm").total / 2**30
    except OSError:
        facts["dev_shm_gb"] = None
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader"])
    facts["nvidia_smi"] = smi.splitlines() if smi else None
    return facts


def machine_info(device: torch.device) -> dict:
    """Versions, device, CPU, thread count, load average (a loaded machine gives slower, noisier numbers)."""
    import timm

    info = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15m": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits, 4)}g}"
    return str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> str:
    """Markdown table of `rows` with (key, header) columns; returns the text it printed."""
    head = [h for _, h in columns]
    body = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path, payload: dict) -> Path | None:
    """Write `payload` (indented JSON) to `path`, creating folders; None path = nothing written."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def report(benchmark: str, args, device: torch.device, peak: dict, results: list[dict]) -> dict:
    """The JSON document every benchmark writes (machine info taken at the end: the load average then)."""
    return {"benchmark": benchmark, "args": vars(args), "machine": machine_info(device), "peak": peak,
            "results": results}
