"""The MAE pretraining step on synthetic on-device input, ours side by side with Hugging Face ViTMAE.

    python benchmarks/pretrain_step.py --variant mae_vit_base_patch16_dec512d8b --batch 256 --precision bf16 \
        [--compile] [--no-sdpa] [--grad-ckpt] [--mask-type block] [--no-hf] --out results.json

One step (autocast forward, backward, the entry points' fused AdamW) the same for both models; the real loop is timed
through the entry point (entry_loop.py). Per model: images/s, step ms, peak memory, the analytic training FLOPs per
image beside FlopCounterMode's count, TFLOP/s and MFU. HF's ViTMAEForPreTraining gets our architecture and weights
(that both compute the same loss is tests/test_hf_agreement.py's).
"""

from __future__ import annotations

import argparse

import torch
import yaml

from benchmarks import common as C
from launch.param_groups import build_adamw, param_groups
from launch.sections import OptimConfig
from models.compile import compile_blocks
from models.convert import to_hf_state_dict
from models.flops import mae_flops_per_image
from models.variants import create_mae

COLUMNS = [("impl", "impl"), ("batch", "batch"), ("precision", "prec"), ("compile", "compile"), ("sdpa", "sdpa"),
           ("mask_type", "mask"), ("images_per_sec", "img/s"), ("step_ms_median", "step ms (median)"),
           ("step_ms_range", "min-max ms"), ("peak_mem_gb", "peak mem GB"), ("train_gflops_analytic", "GFLOP/img"),
           ("train_gflops_counted", "GFLOP/img counter"), ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU")]
LOSS = {"tessera": lambda model, x: model(x)[0], "hf_vitmae": lambda model, x: model(pixel_values=x).loss}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mae_vit_base_patch16_dec512d8b", help="MAE variant (models/variants.py)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="constructor overrides, e.g. depth=2")
    p.add_argument("--batch", type=int, default=256, help="images per step")
    p.add_argument("--precision", choices=sorted(C.PRECISIONS), default="fp32", help="fp32, or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="compile each transformer block (models/compile.py)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first also compiles)")
    p.add_argument("--no-sdpa", action="store_true", help="attention in math mode (timm fused_attn=False, HF eager)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--mask-type", choices=["random", "block"], default="random")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face ViTMAEForPreTraining comparison")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: common.py's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    return p


def overrides(items: list[str]) -> dict:
    """['depth=2', 'norm_pix_loss=false', 'mlp_ratio=2.5'] -> typed values (YAML scalars: int, float, bool, str)."""
    if bad := [item for item in items if "=" not in item]:
        raise SystemExit(f"--override expects KEY=VALUE, got {bad[0]!r}")
    return {key: yaml.safe_load(raw) for key, _, raw in (item.partition("=") for item in items)}


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


def bench(impl: str, model, args, device: torch.device, peak: dict, analytic: dict, shape) -> dict:
    """FlopCounterMode's count of one eager forward+backward, then the timed steps: autocast forward, backward, fused
    AdamW (compiled per --compile: our blocks in place, as the entry points; the HF model whole)."""
    def autocast():
        return torch.autocast(device.type, dtype=C.PRECISIONS[args.precision], enabled=args.precision != "fp32")

    def forward_backward(images: torch.Tensor) -> None:
        with autocast():
            loss = LOSS[impl](model, images)
        loss.backward()

    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    counted = C.count_flops(lambda: forward_backward(x[:4])) / 4
    model.zero_grad(set_to_none=True)
    optimizer = build_adamw(param_groups(model, weight_decay=0.05), OptimConfig(), deepspeed=False)
    if args.compile and impl == "tessera":
        compile_blocks(model)  # in place, block by block: as the entry points
    model = torch.compile(model) if args.compile and impl != "tessera" else model
    inputs = [x, torch.randn_like(x)]

    def step(i: int) -> None:
        forward_backward(inputs[i % 2])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = C.time_steps(step, steps=args.steps, warmup=args.warmup, device=device)
    memory, memory_kind = C.peak_memory_gb(device)
    return {"impl": impl, "variant": args.variant, "batch": args.batch, "precision": args.precision,
            "compile": args.compile, "sdpa": not args.no_sdpa, "grad_ckpt": args.grad_ckpt,
            "mask_type": args.mask_type, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_gflops_analytic": analytic["train"] / 1e9, "train_gflops_counted": counted / 1e9,
            "counted_over_analytic": counted / analytic["train"], **timing,
            "step_ms_range": f"{timing['step_ms_min']:.4g}-{timing['step_ms_max']:.4g}",
            **C.throughput(timing, args.batch, analytic["train"], peak), "peak_mem_gb": memory,
            "peak_mem_kind": memory_kind}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    mae = build_mae(args, device)
    shape = (args.batch, mae.encoder_cfg["in_chans"], mae.encoder_cfg["img_size"], mae.encoder_cfg["img_size"])
    peak, analytic, extra = C.resolve_peak(args.precision, device, args.peak_tflops), mae_flops_per_image(mae), {}
    try:
        hf = None if args.no_hf else build_hf(mae, args, device)
    except ImportError as exc:
        hf, extra = None, {"hf_skipped": str(exc)}
    results = [bench("tessera", mae, args, device, peak, analytic, shape)]
    if hf is not None:
        del mae  # one model's optimizer state in memory at a time
        torch.cuda.empty_cache()  # (a no-op without CUDA)
        results.append(bench("hf_vitmae", hf, args, device, peak, analytic, shape))
        extra["ours_over_hf"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
    results[0].update(extra)
    C.print_table(results, COLUMNS, title=f"MAE pretraining step, {args.variant}, {device}; MFU vs "
                                          f"{peak['peak_tflops']} TFLOP/s ({peak['peak_source']}); memory = "
                                          f"{results[0]['peak_mem_kind']}")
    if "ours_over_hf" in extra:
        print(f"ours / HF images/s: {extra['ours_over_hf']:.3f}", flush=True)
    payload = {"benchmark": "pretrain_step", "args": vars(args), "provenance": C.provenance(), "peak": peak,
               "results": results}
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
