"""Fine-tuning and linear-probe step throughput on synthetic on-device input.

    python benchmarks/finetune_step.py --variant mae_vit_base_patch16_dec512d8b --batch 256 --precision bf16 \
        [--compile] [--mode finetune linprobe] --out ft.json
    python benchmarks/finetune_step.py --device cpu --variant mae_vit_tiny_patch4_dec128d2b --batch 64

finetune: the encoder of the variant as a classifier (models.create_classifier, avg pooling, drop path), timm's
`Mixup` (mixup 0.8 / cutmix 1.0 / label smoothing 0.1 by default) on the batch, SoftTargetCrossEntropy, AdamW over
the library's layer-decay parameter groups; forward + backward + step. The random batch is copied before mixing
(timm mixes in place) so every step mixes fresh images.
linprobe: frozen encoder forward in no_grad (features: CLS token after the final norm), then a
BatchNorm1d(affine=False) + Linear head trained with LARS (finetune/probe.py), as the MAE probe.
FLOPs: finetune = 3 x (full-token ViT forward + head); linprobe = encoder forward + 3 x head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks import common as C  # noqa: E402
from finetune.probe import build_lars  # noqa: E402
from launch.param_groups import param_groups  # noqa: E402
from models.classifier import create_classifier  # noqa: E402
from models.flops import vit_flops_per_image  # noqa: E402
from models.variants import variant_kwargs  # noqa: E402
from models.vit import ENCODER_KEYS, create_encoder  # noqa: E402

MODES = ("finetune", "linprobe")
COLUMNS = [("mode", "mode"), ("variant", "variant"), ("batch", "batch"), ("precision", "prec"),
           ("compile", "compile"), ("sdpa", "sdpa"), ("images_per_sec", "img/s"),
           ("step_ms_median", "step ms (median)"), ("step_ms_range", "min-max ms"), ("peak_mem_gb", "peak mem GB"),
           ("gflops_analytic", "GFLOP/img analytic"), ("gflops_counted", "GFLOP/img counter"),
           ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, variant="mae_vit_base_patch16_dec512d8b", batch=256)
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    return p


def encoder_cfg(args) -> dict:
    kw = variant_kwargs(args.variant, **C.parse_overrides(args.override))
    return {k: kw[k] for k in ENCODER_KEYS if k in kw}


def head_flops(dim: int, num_classes: int) -> int:
    return 2 * dim * num_classes


def finetune_case(args, device, cfg: dict):
    """(model, step(i), fwd_bwd for counting, analytic FLOPs per image, holder)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if args.batch % 2:
        raise SystemExit("timm Mixup needs an even --batch")
    torch.manual_seed(args.seed)
    model = create_classifier(cfg, args.num_classes, global_pool="avg", drop_path_rate=args.drop_path).to(device)
    C.set_sdpa(model, not args.no_sdpa)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    optimizer = C.adamw(param_groups(model, 0.05, args.layer_decay), device, args.fused_adamw, betas=(0.9, 0.999))
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=args.num_classes)
    criterion = SoftTargetCrossEntropy()
    runner = torch.compile(model) if args.compile else model
    shape = (args.batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
    batches = C.random_batches(args.input_sets, shape, device, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    labels = [torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device) for _ in batches]
    scaler = C.grad_scaler(device, args.precision)
    holder: dict = {}

    def loss_of(net, x, y):
        x, soft = mixup(x.clone(), y)  # [B, C, H, W], [B, classes]
        with C.autocast(device, args.precision):
            return criterion(net(x), soft)

    def step(i):
        loss = loss_of(runner, batches[i % len(batches)], labels[i % len(labels)])
        C.optimizer_step(loss, optimizer, scaler)
        holder["loss"] = loss.detach()

    def fwd_bwd(x, y):
        loss_of(model, x, y).backward()
        model.zero_grad(set_to_none=True)

    flops = 3 * (vit_flops_per_image(cfg) + head_flops(cfg["embed_dim"], args.num_classes))
    return model, step, fwd_bwd, flops, holder, shape


def linprobe_case(args, device, cfg: dict):
    torch.manual_seed(args.seed)
    encoder = create_encoder(**cfg).to(device).eval().requires_grad_(False)
    C.set_sdpa(encoder, not args.no_sdpa)
    dim = cfg["embed_dim"]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, args.num_classes)).to(device)
    optimizer = build_lars(head, lr=0.1)
    criterion = nn.CrossEntropyLoss()
    runner = torch.compile(encoder) if args.compile else encoder
    shape = (args.batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
    batches = C.random_batches(args.input_sets, shape, device, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    labels = [torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device) for _ in batches]
    holder: dict = {}

    def loss_of(enc, x, y):
        with torch.no_grad(), C.autocast(device, args.precision):
            feats = enc(x)  # [B, D] CLS token after the final norm
        return criterion(head(feats.float()), y)

    def step(i):
        loss = loss_of(runner, batches[i % len(batches)], labels[i % len(labels)])
        C.optimizer_step(loss, optimizer)
        holder["loss"] = loss.detach()

    def fwd_bwd(x, y):
        loss_of(encoder, x, y).backward()
        head.zero_grad(set_to_none=True)

    flops = vit_flops_per_image(cfg) + 3 * head_flops(dim, args.num_classes)
    return encoder, step, fwd_bwd, flops, holder, shape


def bench(mode: str, args, device, peak: dict, cfg: dict) -> dict:
    case = finetune_case if mode == "finetune" else linprobe_case
    model, step, fwd_bwd, flops, holder, shape = case(args, device, cfg)
    n = 4
    x = torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(7)).to(device)
    y = torch.randint(0, args.num_classes, (n,), generator=torch.Generator().manual_seed(8)).to(device)
    counted = C.count_flops(lambda: fwd_bwd(x, y)) / n
    with C.PeakMemory(device) as mem:
        timing = C.time_steps(step, steps=args.steps, warmup=args.warmup, device=device)
    rec = {"mode": mode, "variant": args.variant, "batch": args.batch, "precision": args.precision,
           "compile": args.compile, "sdpa": not args.no_sdpa, "fused_adamw": C.use_fused_adamw(device, args.fused_adamw)
           if mode == "finetune" else None, "grad_ckpt": args.grad_ckpt, "device": str(device),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "gflops_analytic": flops / 1e9, "gflops_counted": counted / 1e9, "counted_over_analytic": counted / flops,
           **timing, "step_ms_range": f"{timing['step_ms_min']:.4g}-{timing['step_ms_max']:.4g}",
           **C.throughput(timing, args.batch, flops, peak),
           "peak_mem_gb": mem.peak_bytes / 2**30, "peak_mem_kind": mem.kind, "loss_last": float(holder["loss"])}
    del model, step, fwd_bwd, holder
    C.release(device)
    return rec


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_args(args)
    device = C.resolve_device(args.device)
    peak = C.resolve_peak(args, device)
    cfg = encoder_cfg(args)
    results = [bench(mode, args, device, peak, cfg) for mode in args.mode]
    print()
    C.print_table(results, COLUMNS, title=f"ViT fine-tuning / linear-probe step, {device}, MFU vs "
                                          f"{peak['peak_tflops']:.4g} TFLOP/s ({peak['peak_source']})")
    payload = C.report("finetune_step", args, device, peak, results)
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
