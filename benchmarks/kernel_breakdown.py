"""Where a training step's device time goes: steps run under torch.profiler, every CUDA kernel (or, on CPU, every aten
operator's self time) sorted by name into GEMM, attention, elementwise, norm/reduction, copies, optimizer (and on CPU
views/allocations, which cost no kernel); per step: ms and share per category, launches, and the top kernels.
Used by `benchmarks/pretrain_step.py --profile`."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import print_table, sync

# first match wins; names of CUDA kernels (cuBLAS, CUTLASS, flash, inductor's triton) and of aten operators
CATEGORIES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
    ("views/allocation (CPU ops)", r"^aten::(empty|empty_strided|view|reshape|_reshape_alias|as_strided|expand|"
                                   r"permute|transpose|t|slice|select|unsqueeze|squeeze|detach|alias|unbind|split|"
                                   r"narrow|flatten|_unsafe_view|lift_fresh|resolve_conj|resolve_neg|set_|"
                                   r"result_type|item|_local_scalar_dense|is_nonzero|new_empty|new_empty_strided|"
                                   r"zeros_like|empty_like)$"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|mha"),
    ("gemm", r"gemm|cutlass|cublas|xmma|nvjet|sm\d+_|triton_tem|aten::(mm|addmm|bmm|matmul|linear|_convolution|"
             r"convolution|mkldnn)|conv"),
    ("copies", r"memcpy|memset|copy|aten::(cat|index|gather|scatter|to|_to_copy|contiguous|clone|stack|fill_|"
               r"zero_)|cat|gather|scatter|index"),
    ("norm/reduction", r"triton_red|triton_per|norm|reduce|softmax|aten::(sum|mean|var|std|max|argsort|sort)"),
    ("elementwise", r"triton_poi|elementwise|vectorized|unrolled|aten::|triton"))]


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def breakdown(prof, device: torch.device, steps: int) -> dict:
    """Per-step time by category (ms, share, launches) and the top 12 kernels (or operators)."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = float(getattr(evt, "self_device_time_total", 0.0))
            if us <= 0 or getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue  # CPU-side records that also carry their kernels' time: count each kernel once
        elif evt.key.startswith("aten::"):
            us = float(evt.self_cpu_time_total)
        else:
            continue
        per_name[evt.key][0] += us
        per_name[evt.key][1] += evt.count
    total = sum(v[0] for v in per_name.values()) or 1.0
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (us, n) in per_name.items():
        cats[category(name)][0] += us
        cats[category(name)][1] += n
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {"unit": "device kernels" if device.type == "cuda" else "aten operators (self CPU time)",
            "total_ms_per_step": total / 1e3 / steps,
            "categories": [{"category": c, "ms_per_step": us / 1e3 / steps, "share": us / total,
                            "launches_per_step": n / steps} for c, (us, n) in sorted(cats.items(), key=lambda kv:
                                                                                        -kv[1][0])],
            "top": [{"name": k[:110], "category": category(k), "ms_per_step": v[0] / 1e3 / steps,
                     "calls_per_step": v[1] / steps} for k, v in top]}


def profile_steps(step, device: torch.device, steps: int, warmup: int, table: str | None = None) -> dict:
    """`warmup` untimed calls of `step(i)` (compilation), then `steps` under the profiler; the breakdown, printed."""
    for i in range(warmup):
        step(i)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) \
            as prof:
        for i in range(steps):
            step(warmup + i)
        sync(device)
    res = breakdown(prof, device, steps)
    print_table(res["categories"], [("category", "category"), ("ms_per_step", "ms/step"), ("share", "share"),
                                    ("launches_per_step", "launches/step")],
                title=f"{res['unit']}: {res['total_ms_per_step']:.2f} ms/step profiled")
    print_table(res["top"], [("name", "top kernels"), ("category", "category"), ("ms_per_step", "ms/step"),
                             ("calls_per_step", "calls/step")])
    if table:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(table).write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    return res
