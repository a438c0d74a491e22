"""End-to-end MAE pretraining throughput reading WebDataset shards through `build_train_loader`, against the same
step on synthetic on-device input: says whether data loading holds the step back.

    python benchmarks/pretrain_e2e.py --data data/sample:train --workers 8 --variant mae_vit_base_patch16_dec512d8b \
        --batch 256 --precision bf16 --out e2e.json
    python benchmarks/pretrain_e2e.py --device cpu --variant mae_vit_tiny_patch4_dec128d2b --batch 64 --workers 1

Three timed windows of `--steps` steps each, after `--warmup` steps (which also start the loader's workers):
1. synthetic: the training step on random batches already on the device;
2. loader only: `next(loader)` and the copy to the device, no model (the rate the data path can deliver);
3. end to end: `next(loader)`, copy to the device (pinned, non-blocking on CUDA), training step.
The end-to-end window runs first, after enough warm-up steps to use up the batches the workers queued while
starting; the loader-only window first drains what was queued during the synthetic window. With --rounds R the
end-to-end and synthetic windows alternate R times (the batches queued in between are taken out untimed).
Rates are window images/s (one synchronize at each end), so the end-to-end and synthetic numbers are measured the
same way; `e2e_over_synthetic` near 1 means the loader keeps up. `data_wait_ms` is the mean host time spent in
`next(loader)` per end-to-end step. The training step is pretrain_step.py's (same model, optimizer, precision).
The shipped sample is 32 px CIFAR-10; for 224 px models write larger JPEG shards with
benchmarks/make_bench_shards.py (decode cost grows with the source size, which the sample does not show).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402
from benchmarks.pretrain_step import build_mae, make_train_step, ours_loss  # noqa: E402
from data.train_stream import build_train_loader  # noqa: E402
from data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, pretrain_transform  # noqa: E402
from launch.param_groups import param_groups  # noqa: E402
from models.flops import mae_flops_per_image  # noqa: E402

COLUMNS = [("mode", "input"), ("variant", "variant"), ("batch", "batch"), ("precision", "prec"),
           ("compile", "compile"), ("workers", "workers"), ("images_per_sec", "img/s"),
           ("step_ms_mean", "ms/step"), ("data_wait_ms", "wait ms/step"), ("mfu", "MFU"),
           ("vs_synthetic", "vs synthetic")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, variant="mae_vit_base_patch16_dec512d8b", batch=256)
    p.add_argument("--data", default="data/sample:train", help="shard spec (dir[:split], brace pattern, URLs)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    p.add_argument("--prefetch", type=int, default=None, help="batches prefetched per worker (torch default 2)")
    p.add_argument("--draft", action="store_true", help="decode JPEGs at reduced size (PIL draft) when large")
    p.add_argument("--stats", choices=["imagenet", "cifar10"], default="imagenet", help="normalisation mean/std")
    p.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--no-loader-only", action="store_true", help="skip the loader-only window")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate end-to-end and synthetic windows this many times (fairer on a shared CPU)")
    return p


def window(fn, steps: int, device: torch.device) -> float:
    """Wall seconds for `steps` calls of fn(i), synchronised at both ends."""
    C.sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    C.sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_args(args)
    if args.workers < 0:
        raise SystemExit(f"--workers must be >= 0, got {args.workers}")
    if not 1 <= args.rounds <= args.steps:
        raise SystemExit(f"--rounds must be between 1 and --steps, got {args.rounds}")
    device = C.resolve_device(args.device)
    peak = C.resolve_peak(args, device)
    model = build_mae(args, device)
    img = model.encoder_cfg["img_size"]
    shape = (args.batch, model.encoder_cfg["in_chans"], img, img)
    flops = mae_flops_per_image(model)["train"]
    optimizer = C.adamw(param_groups(model, weight_decay=0.05), device, args.fused_adamw)
    runner = torch.compile(model) if args.compile else model

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.stats == "imagenet" else (CIFAR10_MEAN, CIFAR10_STD)
    cuda = device.type == "cuda"
    loader = build_train_loader(args.data, batch_size=args.batch, transform=pretrain_transform(img, mean, std),
                                seed=args.seed, num_workers=args.workers, pin_memory=cuda,
                                prefetch_factor=args.prefetch, decode_size=img if args.draft else None)
    stream = iter(loader)
    holder: dict = {}
    synthetic = C.random_batches(args.input_sets, shape, device, args.seed)
    synth_step = make_train_step(runner, ours_loss, optimizer, synthetic, device, args.precision, holder)
    slot = [None]
    loaded_step = make_train_step(runner, ours_loss, optimizer, slot, device, args.precision, holder)
    wait = [0.0]

    def fetch(_i=0):
        t0 = time.perf_counter()
        batch = next(stream)
        wait[0] += time.perf_counter() - t0
        x = batch["image"].to(device, non_blocking=cuda)
        if x.shape != shape:
            raise SystemExit(f"loader gave images of shape {tuple(x.shape)}, the model expects {shape}")
        return x

    def e2e(i):
        slot[0] = fetch()
        loaded_step(0)

    # Warm-up: compile + allocator on synthetic input; then end-to-end steps until the batches the loader had
    # prefetched while the workers started are used up (its queue holds up to workers x prefetch batches), so the
    # end-to-end window sees the loader's steady state, not a full queue.
    queued = max(1, args.workers) * (args.prefetch or 2)
    first_t0 = time.perf_counter()
    for i in range(max(1, args.warmup)):
        synth_step(i)
    C.sync(device)
    first_s = time.perf_counter() - first_t0
    for i in range(max(args.warmup, queued + 2)):
        e2e(i)

    # --rounds R: alternate end-to-end and synthetic windows R times (same machine load for both on a shared CPU);
    # before each end-to-end window the batches queued meanwhile are taken out untimed.
    per_round = [args.steps // args.rounds + (1 if r < args.steps % args.rounds else 0) for r in range(args.rounds)]
    t_e2e = t_syn = 0.0
    wait[0] = 0.0
    done = 0
    with C.PeakMemory(device) as mem:
        for r, k in enumerate(per_round):
            if r:
                before = wait[0]
                for _ in range(queued):
                    fetch()
                wait[0] = before
            t_e2e += window(e2e, k, device)
            t_syn += window(lambda i, o=done: synth_step(o + i), k, device)
            done += k
    e2e_row = {"mode": "end to end", "seconds": t_e2e, "data_wait_ms": wait[0] / args.steps * 1e3}
    rows = [{"mode": "synthetic", "seconds": t_syn}]
    if not args.no_loader_only:
        for _ in range(queued):  # drain what the workers queued during the synthetic window
            fetch()
        rows.append({"mode": "loader only", "seconds": window(fetch, args.steps, device), "model_flops": False})
    rows.append(e2e_row)
    del stream

    base = {"variant": args.variant, "batch": args.batch, "precision": args.precision, "compile": args.compile,
            "workers": args.workers, "data": args.data, "device": str(device), "sdpa": not args.no_sdpa,
            "fused_adamw": C.use_fused_adamw(device, args.fused_adamw), "grad_ckpt": args.grad_ckpt}
    for r in rows:
        r.update(base)
        r["images_per_sec"] = args.steps * args.batch / r["seconds"]
        r["step_ms_mean"] = r["seconds"] / args.steps * 1e3
        r["vs_synthetic"] = t_syn / r["seconds"]
        if r.pop("model_flops", True):
            r["achieved_tflops"] = r["images_per_sec"] * flops / 1e12
            r["mfu"] = r["achieved_tflops"] / peak["peak_tflops"]
    rows[0].update(peak_mem_gb=mem.peak_bytes / 2**30, peak_mem_kind=mem.kind, first_step_s=first_s,
                   train_gflops_analytic=flops / 1e9, loss_last=float(holder["loss"]))
    ratio = t_syn / t_e2e
    print()
    C.print_table(rows, COLUMNS, title=f"MAE pretraining end to end from {args.data}, {device}; rates over "
                                       f"{args.steps} steps after {args.warmup} warm-up")
    loader_row = next((r for r in rows if r["mode"] == "loader only"), None)
    wait_share = e2e_row["data_wait_ms"] / e2e_row["step_ms_mean"]
    if ratio >= 0.9:
        verdict = "the loader keeps up (within 10%)"
    elif wait_share > 0.1:
        verdict = f"data loading holds the step back ({wait_share:.0%} of each step waits for a batch)"
    else:
        verdict = (f"slower end to end, but only {wait_share:.0%} of each step waits for a batch: the loader's "
                   f"workers compete with the step for the CPU")
    extra = f"; loader alone {loader_row['images_per_sec']:.4g} img/s" if loader_row else ""
    print(f"end-to-end / synthetic: {ratio:.3f}: {verdict}{extra}", flush=True)
    payload = C.report("pretrain_e2e", args, device, peak, rows)
    payload["e2e_over_synthetic"] = ratio
    payload["data_wait_share"] = wait_share
    payload["verdict"] = verdict
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
