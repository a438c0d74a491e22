"""The MAE pretraining step of one model on synthetic on-device input, ours side by side with Hugging Face ViTMAE;
with --profile, where our step's device time goes instead.

    python benchmarks/pretrain_step.py --variant mae_vit_base_patch16_dec512d8b --batch 256 --precision bf16 \
        [--compile] [--no-sdpa] [--grad-ckpt] [--mask-type block] [--no-hf] --out results.json
    python benchmarks/pretrain_step.py --variant mae_vit_tiny_patch4_dec128d2b --batch 64   # CPU
    python benchmarks/pretrain_step.py --profile --no-hf --compile --batch 512 --precision bf16 --table kernels.txt

One step = autocast forward (masks drawn inside, as in training), backward, and the entry points' fused AdamW over
the library's parameter groups (launch/param_groups.py), the same for both models, so the two compare like for like;
the step of the real loop, with its schedule and guards, is timed through the entry point (benchmarks/entry_loop.py).
--compile compiles each of our transformer blocks (models/compile.py, as the entry points on CUDA) and the HF model
whole. Reported per model: images/s and step time (median, min-max), peak memory, the analytic training FLOPs per
image (models/flops.py) next to FlopCounterMode's count of one forward+backward, achieved TFLOP/s and MFU. HF's
`ViTMAEForPreTraining` gets our architecture and initial weights (models/convert.to_hf_state_dict); a same-noise
forward checks that both compute the same loss before timing (skipped with --no-hf or without transformers).
--profile runs our steps under torch.profiler and sorts the time into kernel categories (benchmarks/kernel_breakdown).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402
from launch.param_groups import build_adamw, param_groups  # noqa: E402
from launch.sections import OptimConfig  # noqa: E402
from models.compile import compile_blocks  # noqa: E402
from models.convert import to_hf_state_dict  # noqa: E402
from models.flops import mae_flops_per_image  # noqa: E402
from models.variants import create_mae  # noqa: E402

COLUMNS = [("impl", "impl"), ("batch", "batch"), ("precision", "prec"), ("compile", "compile"), ("sdpa", "sdpa"),
           ("mask_type", "mask"), ("images_per_sec", "img/s"), ("step_ms_median", "step ms (median)"),
           ("step_ms_range", "min-max ms"), ("peak_mem_gb", "peak mem GB"), ("train_gflops_analytic", "GFLOP/img"),
           ("train_gflops_counted", "GFLOP/img counter"), ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mae_vit_base_patch16_dec512d8b", help="MAE variant (models/variants.py)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor overrides for the variant, e.g. depth=2 decoder_depth=1 img_size=64")
    p.add_argument("--batch", type=int, default=256, help="images per step")
    p.add_argument("--precision", choices=sorted(C.PRECISIONS), default="fp32", help="fp32, or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="compile each transformer block (models/compile.py)")
    p.add_argument("--steps", type=int, default=10, help="timed (or profiled) steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first also compiles)")
    p.add_argument("--no-sdpa", action="store_true", help="attention in math mode (timm fused_attn=False, HF eager)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--mask-type", choices=["random", "block"], default="random")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face ViTMAEForPreTraining comparison")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: see common.py)")
    p.add_argument("--profile", action="store_true", help="profile our step instead of timing it (kernel categories)")
    p.add_argument("--table", default=None, help="with --profile: write torch's key_averages table here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    return p


def overrides(items: list[str]) -> dict:
    """['depth=2', 'norm_pix_loss=false', 'mlp_ratio=2.5'] -> typed values (int, float, bool, else str)."""
    def typed(raw: str):
        for cast in (int, float):
            try:
                return cast(raw)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(raw.lower(), raw)

    if bad := [item for item in items if "=" not in item]:
        raise SystemExit(f"--override expects KEY=VALUE, got {bad[0]!r}")
    return {key: typed(raw) for key, _, raw in (item.partition("=") for item in items)}


def build_mae(args, device: torch.device):
    torch.manual_seed(args.seed)
    model = create_mae(args.variant, **{"norm_pix_loss": True, "mask_type": args.mask_type,
                                        **overrides(args.override)}).to(device)
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = not args.no_sdpa
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def build_hf(mae, args, device: torch.device):
    """HF ViTMAEForPreTraining with exactly our architecture and our current weights (so both start equal)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    enc, dec = mae.encoder_cfg, mae.decoder_cfg
    hf = ViTMAEForPreTraining(ViTMAEConfig(
        hidden_size=enc["embed_dim"], num_hidden_layers=enc["depth"], num_attention_heads=enc["num_heads"],
        intermediate_size=int(enc["embed_dim"] * enc["mlp_ratio"]), image_size=enc["img_size"],
        patch_size=enc["patch_size"], num_channels=enc["in_chans"], qkv_bias=True, layer_norm_eps=1e-6,
        hidden_act="gelu", decoder_hidden_size=dec["embed_dim"], decoder_num_hidden_layers=dec["depth"],
        decoder_num_attention_heads=dec["num_heads"],
        decoder_intermediate_size=int(dec["embed_dim"] * dec["mlp_ratio"]), mask_ratio=mae.mask_ratio,
        norm_pix_loss=mae.norm_pix_loss, attn_implementation="eager" if args.no_sdpa else "sdpa"))
    spelling = "v5" if any(k.startswith("vit.layers.") for k in hf.state_dict()) else "v4"
    hf.load_state_dict(to_hf_state_dict(mae.state_dict(), spelling), strict=True)
    if args.grad_ckpt:
        hf.gradient_checkpointing_enable()
    return hf.to(device)


LOSS = {"tessera": lambda model, x: model(x)[0], "hf_vitmae": lambda model, x: model(pixel_values=x).loss}


@torch.no_grad()
def agreement(mae, hf, shape, device: torch.device, n: int = 4) -> dict:
    """Same images, same masking noise, fp32, eval mode: |loss difference| and max |prediction difference|."""
    g = torch.Generator().manual_seed(123)
    imgs = torch.randn((n, *shape[1:]), generator=g).to(device)
    noise = torch.rand(n, mae.grid_size[0] * mae.grid_size[1], generator=g).to(device)
    mae.eval(), hf.eval()
    loss, pred, _ = mae(imgs, noise=noise)
    out = hf(pixel_values=imgs, noise=noise)
    mae.train(), hf.train()
    return {"hf_loss_abs_diff": abs(loss.item() - out.loss.item()),
            "hf_pred_max_abs_diff": (pred - out.logits).abs().max().item()}


def training_step(impl: str, model, args, device: torch.device, shape):
    """step(i): autocast forward, backward, fused AdamW, over 2 random input sets (compiled per --compile)."""
    optimizer = build_adamw(param_groups(model, weight_decay=0.05), OptimConfig(), deepspeed=False)
    if args.compile and impl == "tessera":
        compile_blocks(model)  # in place: regional, as the entry points
    elif args.compile:
        model = torch.compile(model)
    g = torch.Generator().manual_seed(args.seed)
    inputs = [torch.randn(shape, generator=g).to(device) for _ in range(2)]
    autocast = torch.autocast(device.type, dtype=C.PRECISIONS[args.precision], enabled=args.precision != "fp32")

    def step(i: int) -> None:
        with autocast:
            loss = LOSS[impl](model, inputs[i % 2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def counted_flops_per_image(impl: str, model, args, device: torch.device, shape, n: int = 4) -> float:
    """FlopCounterMode over one forward+backward of n images (eager model), per image; gradients discarded."""
    x = torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(7)).to(device)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=C.PRECISIONS[args.precision], enabled=args.precision != "fp32"):
            loss = LOSS[impl](model, x)
        loss.backward()

    total = C.count_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return total / n


def bench(impl: str, model, args, device, peak: dict, analytic: dict, shape) -> dict:
    counted = counted_flops_per_image(impl, model, args, device, shape)
    step = training_step(impl, model, args, device, shape)
    with C.PeakMemory(device) as mem:
        timing = C.time_steps(step, steps=args.steps, warmup=args.warmup, device=device)
    return {"impl": impl, "variant": args.variant, "batch": args.batch, "precision": args.precision,
            "compile": args.compile, "sdpa": not args.no_sdpa, "grad_ckpt": args.grad_ckpt,
            "mask_type": args.mask_type, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_gflops_analytic": analytic["train"] / 1e9, "train_gflops_counted": counted / 1e9,
            "counted_over_analytic": counted / analytic["train"], **timing,
            "step_ms_range": f"{timing['step_ms_min']:.4g}-{timing['step_ms_max']:.4g}",
            **C.throughput(timing, args.batch, analytic["train"], peak), "peak_mem_gb": mem.gb,
            "peak_mem_kind": mem.kind}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    mae = build_mae(args, device)
    enc = mae.encoder_cfg
    shape = (args.batch, enc["in_chans"], enc["img_size"], enc["img_size"])
    if args.profile:
        from benchmarks.kernel_breakdown import profile_steps

        step = training_step("tessera", mae, args, device, shape)
        result = profile_steps(step, device, args.steps, args.warmup, table=args.table)
        payload = {"benchmark": "pretrain_step_profile", "args": vars(args), "provenance": C.provenance(),
                   "results": [{**result, "variant": args.variant, "batch": args.batch, "precision": args.precision,
                                "compile": args.compile, "mask_type": args.mask_type}]}
        C.write_json(args.out, payload)
        return payload
    peak, analytic = C.resolve_peak(args.precision, device, args.peak_tflops), mae_flops_per_image(mae)
    print(f"{args.variant}: {sum(p.numel() for p in mae.parameters()) / 1e6:.2f}M params, analytic "
          f"{analytic['train'] / 1e9:.3f} GFLOP/img per training step; peak {peak['peak_tflops']:.4g} TFLOP/s "
          f"({peak['peak_source']})", flush=True)
    hf, extra = None, {}
    if not args.no_hf:
        try:
            hf = build_hf(mae, args, device)
            extra = agreement(mae, hf, shape, device)
        except ImportError as exc:
            print(f"skipping the Hugging Face comparison: {exc}", flush=True)
            extra = {"hf_skipped": str(exc)}
    results = [bench("tessera", mae, args, device, peak, analytic, shape)]
    if hf is not None:
        del mae  # one model's optimizer state in memory at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(bench("hf_vitmae", hf, args, device, peak, analytic, shape))
        extra["ours_over_hf"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
    results[0].update(extra)
    C.print_table(results, COLUMNS, title=f"MAE pretraining step, {device}, MFU vs {peak['peak_tflops']:.4g} TFLOP/s "
                                          f"({peak['peak_source']}); memory = {results[0]['peak_mem_kind']}")
    if "ours_over_hf" in extra:
        print(f"ours / HF images/s: {extra['ours_over_hf']:.3f}", flush=True)
    payload = {"benchmark": "pretrain_step", "args": vars(args), "provenance": C.provenance(), "peak": peak,
               "results": results}
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
