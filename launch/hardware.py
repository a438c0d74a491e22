"""The machine a run runs on, and the peak arithmetic rate of accelerators (for model FLOP utilisation).

`describe()` is what a run record says about the hardware. `peak_tflops(device_name, precision)` is the vendor's dense
(no sparsity) peak per device, in TFLOP/s, for the precision the run computes in, or None when unknown (CPUs, other
GPUs): then only the achieved TFLOP/s is reported. Figures from the vendors' data sheets (H100 SXM and H200: 989
bf16/fp16, 494 TF32; A100: 312 bf16/fp16, 156 TF32; L4: 121 and 60; A10: 125 and 62.5; V100: 125 fp16, 15.7 fp32).
"""

from __future__ import annotations

import os
import platform

import torch

# device-name substring -> {precision: dense peak TFLOP/s per device}; the first match wins (H100 PCIe before H100)
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def precision_name(mixed_precision: str) -> str:
    """Accelerate's mixed_precision ("no", "bf16", "fp16") as the arithmetic the matmuls run in."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Dense peak TFLOP/s of one device of that name in that precision, or None when unknown."""
    if not device_name:
        return None
    for key, table in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return table.get(precision)
    return None


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (CUDA), else the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """Host, CPU model and cores (usable by this process), memory, and every visible GPU with its memory."""
    import psutil

    out = {"host": platform.node(), "cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)),
           "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    return out


__all__ = ["PEAK_TFLOPS", "peak_tflops", "precision_name", "device_name", "cpu_model", "describe"]
