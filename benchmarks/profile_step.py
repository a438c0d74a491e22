"""Where a training step's device time goes: a torch.profiler breakdown of the MAE step into GEMM, attention,
elementwise, norm/reduction, copies and optimizer kernels (on CPU also views/allocations, which cost no kernel).

    python benchmarks/profile_step.py --variant mae_vit_base_patch16_dec512d8b --batch 512 --precision bf16 \
        --compile --out profile.json
    python benchmarks/profile_step.py --variant mae_vit_tiny_patch4_dec128d2b --batch 16   # CPU: aten ops instead

The step is the shared loop's (benchmarks/loop_timing.py), on synthetic device batches; `--warmup` steps first
(compilation), then `--steps` steps under the profiler. On CUDA every kernel is classified by name (cuBLAS/CUTLASS
and inductor's `triton_tem` templates = GEMM; flash/efficient attention; inductor's `triton_poi` = elementwise,
`triton_red`/`triton_per` = norm/reduction; memcpy/memset/copy/cat/gather = copies; fused AdamW = optimizer);
on CPU the aten operators' self time is classified the same way. Reports per step: device ms and share per
category, kernel launches, and the top kernels; `--table` writes torch's own key_averages table.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks import common as C  # noqa: E402
from benchmarks.loop_timing import synthetic_batches, time_loop  # noqa: E402
from launch.accel import build_accelerator  # noqa: E402
from launch.param_groups import build_adamw, param_groups  # noqa: E402
from launch.sections import OptimConfig, RunConfig  # noqa: E402
from models.compile import compile_blocks  # noqa: E402
from models.variants import create_mae  # noqa: E402

# first match wins; names of CUDA kernels (cuBLAS, CUTLASS, flash, inductor's triton) and of aten operators
CATEGORIES = [
    ("views/allocation (CPU ops)", r"^aten::(empty|empty_strided|view|reshape|_reshape_alias|as_strided|expand|permute|"
                                   r"transpose|t|slice|select|unsqueeze|squeeze|detach|alias|unbind|split|narrow|"
                                   r"flatten|_unsafe_view|lift_fresh|resolve_conj|resolve_neg|set_|result_type|"
                                   r"item|_local_scalar_dense|is_nonzero|new_empty|new_empty_strided|zeros_like|"
                                   r"empty_like)$"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|mha"),
    ("gemm", r"gemm|cutlass|cublas|xmma|nvjet|sm\d+_|triton_tem|aten::(mm|addmm|bmm|matmul|linear|_convolution|"
             r"convolution|mkldnn)|conv"),
    ("copies", r"memcpy|memset|copy|aten::(cat|index|gather|scatter|to|_to_copy|contiguous|clone|stack|fill_|zero_)"
               r"|cat|gather|scatter|index"),
    ("norm/reduction", r"triton_red|triton_per|norm|reduce|softmax|aten::(sum|mean|var|std|max|argsort|sort)"),
    ("elementwise", r"triton_poi|elementwise|vectorized|unrolled|aten::|triton"),
]
_PATTERNS = [(name, re.compile(pat, re.IGNORECASE)) for name, pat in CATEGORIES]


def category(name: str) -> str:
    for cat, pat in _PATTERNS:
        if pat.search(name):
            return cat
    return "other"


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def breakdown(prof, device: torch.device, steps: int) -> dict:
    """Per-step time by category (ms), launches and the top 12 kernels/operators."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = _self_device_us(evt)
            kind = getattr(evt, "device_type", None)
            on_device = kind == torch.autograd.DeviceType.CUDA if kind is not None else not evt.key.startswith(
                ("aten::", "autograd::", "Optimizer.", "ProfilerStep", "## ", "cuda"))
            if us <= 0 or not on_device:
                continue  # CPU-side records that also carry their kernels' time: count each kernel once
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = float(evt.self_cpu_time_total)
        per_name[evt.key][0] += us
        per_name[evt.key][1] += evt.count
    total = sum(v[0] for v in per_name.values()) or 1.0
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (us, n) in per_name.items():
        cats[category(name)][0] += us
        cats[category(name)][1] += n
    rows = [{"category": c, "ms_per_step": us / 1e3 / steps, "share": us / total, "launches_per_step": n / steps}
            for c, (us, n) in sorted(cats.items(), key=lambda kv: -kv[1][0])]
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {"unit": "device kernels" if device.type == "cuda" else "aten operators (self CPU time)",
            "total_ms_per_step": total / 1e3 / steps, "categories": rows,
            "top": [{"name": k[:110], "category": category(k), "ms_per_step": v[0] / 1e3 / steps,
                     "calls_per_step": v[1] / steps} for k, v in top]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, variant="mae_vit_base_patch16_dec512d8b", batch=512)
    p.add_argument("--mask-type", choices=["random", "block"], default="random")
    p.add_argument("--table", default=None, help="write torch's key_averages table (text) here")
    args = p.parse_args(argv)
    C.check_args(args)
    accelerator = build_accelerator(RunConfig(precision=C.ACCELERATE_PRECISION[args.precision], trackers=("none",)),
                                    OptimConfig())
    device = C.check_device(args.device, accelerator.device)
    overrides = {"norm_pix_loss": True, "mask_type": args.mask_type, **C.parse_overrides(args.override)}
    torch.manual_seed(args.seed)
    model = create_mae(args.variant, **overrides).to(device)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    enc = model.encoder_cfg
    shape = (args.batch, enc["in_chans"], enc["img_size"], enc["img_size"])
    optimizer = build_adamw(param_groups(model, weight_decay=0.05), OptimConfig(), deepspeed=False)
    if args.compile:
        compile_blocks(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = synthetic_batches(shape, device, sets=args.input_sets, seed=args.seed)

    def step_fn(b):
        return model(b["image"])[0]

    warm = time_loop(accelerator, model, optimizer, step_fn, batches, steps=1, warmup=args.warmup, window=1,
                     global_batch=args.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed = time_loop(accelerator, model, optimizer, step_fn, batches, steps=args.steps, warmup=1,
                          window=args.window, global_batch=args.batch)
    res = breakdown(prof, device, args.steps + 1)  # the profiled loop ran warmup (1) + steps
    res.update(step_ms_profiled=timed["step_ms_median"], warmup_s=warm["warmup_s"], compile=args.compile,
               variant=args.variant, batch=args.batch, precision=args.precision, mask_type=args.mask_type)
    C.print_table(res["categories"], [("category", "category"), ("ms_per_step", "ms/step"), ("share", "share"),
                                      ("launches_per_step", "launches/step")],
                  title=f"{args.variant} batch {args.batch} {args.precision} compile={args.compile}: "
                        f"{res['unit']}, {res['total_ms_per_step']:.2f} ms/step profiled")
    C.print_table(res["top"], [("name", "top kernels"), ("category", "category"), ("ms_per_step", "ms/step"),
                               ("calls_per_step", "calls/step")])
    if args.table:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(args.table).write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    payload = {"benchmark": "profile_step", "args": vars(args), "machine": C.machine_info(device), "results": [res]}
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
