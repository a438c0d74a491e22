"""MAE pretraining step throughput on synthetic on-device input, ours side by side with Hugging Face ViTMAE.

    python benchmarks/pretrain_step.py --variant mae_vit_base_patch16_dec512d8b --batch 256 --precision bf16 \
        [--compile] [--no-sdpa] [--grad-ckpt] [--mask-type block] [--no-hf] --out results.json
    python benchmarks/pretrain_step.py --variant mae_vit_tiny_patch4_dec128d2b --batch 64   # CPU

One step = one optimizer step of the shared training loop (`launch/loop.py`, through `benchmarks/loop_timing.py`):
forward with the masks drawn inside, as in training, Accelerate's autocast and backward, the entry points' fused
AdamW over the library's parameter groups (launch/param_groups.py), lr schedule and non-finite guard. --compile
compiles each transformer block (models/compile.py, what the entry points do on CUDA). Reported per model:
images/s and step time (median of the timed windows), peak memory, the analytic training FLOPs per image
(models/flops.py) next to what torch's FlopCounterMode counts for one forward+backward, achieved
TFLOP/s and MFU. The Hugging Face `ViTMAEForPreTraining` gets the same architecture (ViTMAEConfig built from our
model), our initial weights (models/convert.to_hf_state_dict), the same batch, precision and optimizer; a
same-noise forward checks that both compute the same loss before timing. Skipped with --no-hf or when
transformers is not installed (HF is compiled whole with --compile).
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

from benchmarks import common as C  # noqa: E402
from benchmarks.loop_timing import set_sdpa, synthetic_batches, time_loop  # noqa: E402
from launch.accel import build_accelerator  # noqa: E402
from launch.param_groups import build_adamw, param_groups  # noqa: E402
from launch.sections import OptimConfig, RunConfig  # noqa: E402
from models.compile import compile_blocks  # noqa: E402
from models.convert import to_hf_state_dict  # noqa: E402
from models.flops import mae_flops_per_image  # noqa: E402
from models.variants import create_mae  # noqa: E402

COLUMNS = [("impl", "impl"), ("variant", "variant"), ("batch", "batch"), ("precision", "prec"),
           ("compile", "compile"), ("sdpa", "sdpa"), ("mask_type", "mask"), ("grad_ckpt", "ckpt"),
           ("images_per_sec", "img/s"), ("step_ms_median", "step ms (median)"), ("step_ms_range", "min-max ms"),
           ("peak_mem_gb", "peak mem GB"), ("train_gflops_analytic", "GFLOP/img analytic"),
           ("train_gflops_counted", "GFLOP/img counter"), ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, variant="mae_vit_base_patch16_dec512d8b", batch=256)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face ViTMAEForPreTraining comparison")
    p.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised pixel loss (the official recipe)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the variant's (0.75)")
    p.add_argument("--mask-type", choices=["random", "block"], default="random")
    return p


# ------------------------------------------------------------------------------------------------- models


def build_mae(args, device: torch.device):
    overrides = C.parse_overrides(args.override)
    overrides.setdefault("norm_pix_loss", args.norm_pix)
    overrides.setdefault("mask_type", args.mask_type)
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    torch.manual_seed(args.seed)
    model = create_mae(args.variant, **overrides).to(device)
    set_sdpa(model, not args.no_sdpa)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def hf_config(mae, attn_implementation: str):
    """ViTMAEConfig with exactly our model's architecture."""
    from transformers import ViTMAEConfig

    enc, dec = mae.encoder_cfg, mae.decoder_cfg
    return ViTMAEConfig(
        hidden_size=enc["embed_dim"], num_hidden_layers=enc["depth"], num_attention_heads=enc["num_heads"],
        intermediate_size=int(enc["embed_dim"] * enc["mlp_ratio"]), image_size=enc["img_size"],
        patch_size=enc["patch_size"], num_channels=enc["in_chans"], qkv_bias=True, layer_norm_eps=1e-6,
        hidden_act="gelu", decoder_hidden_size=dec["embed_dim"], decoder_num_hidden_layers=dec["depth"],
        decoder_num_attention_heads=dec["num_heads"],
        decoder_intermediate_size=int(dec["embed_dim"] * dec["mlp_ratio"]),
        mask_ratio=mae.mask_ratio, norm_pix_loss=mae.norm_pix_loss, attn_implementation=attn_implementation)


def build_hf(mae, args, device: torch.device):
    """HF ViTMAEForPreTraining with our architecture and our current weights (so both start equal)."""
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_config(mae, "eager" if args.no_sdpa else "sdpa"))
    spelling = "v5" if any(k.startswith("vit.layers.") for k in hf.state_dict()) else "v4"
    hf.load_state_dict(to_hf_state_dict(mae.state_dict(), spelling), strict=True)
    hf.to(device)
    if args.grad_ckpt:
        hf.gradient_checkpointing_enable()
    return hf


def ours_loss(model, x):
    return model(x)[0]


def hf_loss(model, x):
    return model(pixel_values=x).loss


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


# ------------------------------------------------------------------------------------------------- steps


def counted_flops_per_image(accelerator, model, loss_of, shape, device: torch.device, n: int = 4) -> float:
    """FlopCounterMode over one forward+backward of n images (eager model), per image; gradients discarded."""
    x = torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(7)).to(device)

    def fwd_bwd():
        with accelerator.autocast():
            loss = loss_of(model, x)
        loss.backward()

    total = C.count_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return total / n


def bench_model(impl: str, accelerator, model, loss_of, args, device, peak: dict, analytic: dict, shape) -> dict:
    """Time one model's training step through the shared loop; returns the result record."""
    counted = counted_flops_per_image(accelerator, model, loss_of, shape, device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    optimizer = build_adamw(param_groups(model, weight_decay=0.05), OptimConfig(), deepspeed=False)
    if args.compile:
        if impl == "tessera":
            compile_blocks(model)
        else:
            model = torch.compile(model)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    batches = synthetic_batches(shape, device, sets=args.input_sets, seed=args.seed)
    with C.PeakMemory(device) as mem:
        timing = time_loop(accelerator, prepared, optimizer, lambda b: loss_of(prepared, b["image"]), batches,
                           steps=args.steps, warmup=args.warmup, window=args.window, global_batch=args.batch)
    rec = {
        "impl": impl, "variant": args.variant, "batch": args.batch, "precision": args.precision,
        "compile": args.compile, "sdpa": not args.no_sdpa, "grad_ckpt": args.grad_ckpt, "mask_type": args.mask_type,
        "device": str(device), "params_m": params_m,
        "train_gflops_analytic": analytic["train"] / 1e9, "train_gflops_counted": counted / 1e9,
        "counted_over_analytic": counted / analytic["train"],
        **timing, "step_ms_range": f"{timing['step_ms_min']:.4g}-{timing['step_ms_max']:.4g}",
        **C.throughput(timing, args.batch, analytic["train"], peak),
        "peak_mem_gb": mem.peak_bytes / 2**30, "peak_mem_kind": mem.kind,
    }
    return rec  # the models and optimizer go with this frame: the caller then releases the cache


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_args(args)
    accelerator = build_accelerator(RunConfig(precision=C.ACCELERATE_PRECISION[args.precision], trackers=("none",)),
                                    OptimConfig())
    device = C.check_device(args.device, accelerator.device)
    peak = C.resolve_peak(args, device)
    mae = build_mae(args, device)
    enc = mae.encoder_cfg
    shape = (args.batch, enc["in_chans"], enc["img_size"], enc["img_size"])
    analytic = mae_flops_per_image(mae)
    print(f"{args.variant}: {sum(p.numel() for p in mae.parameters()) / 1e6:.2f}M params, analytic "
          f"{analytic['train'] / 1e9:.3f} GFLOP/img per training step (encoder {analytic['encoder'] / 1e9:.3f} + "
          f"decoder {analytic['decoder'] / 1e9:.3f} forward, x3); peak {peak['peak_tflops']:.4g} TFLOP/s "
          f"({peak['peak_source']})", flush=True)

    hf, extra = None, {}
    if not args.no_hf:
        try:
            hf = build_hf(mae, args, device)
            extra = agreement(mae, hf, shape, device)
            print(f"HF ViTMAE loaded with our weights: |loss diff| {extra['hf_loss_abs_diff']:.2e}, "
                  f"max |pred diff| {extra['hf_pred_max_abs_diff']:.2e}", flush=True)
        except ImportError as exc:
            print(f"skipping the Hugging Face comparison: {exc}", flush=True)
            extra = {"hf_skipped": str(exc)}
    results = [bench_model("tessera", accelerator, mae, ours_loss, args, device, peak, analytic, shape)]
    del mae
    C.release(device)
    if hf is not None:
        results.append(bench_model("hf_vitmae", accelerator, hf, hf_loss, args, device, peak, analytic, shape))
        del hf
        C.release(device)
        extra["ours_over_hf"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
    results[0].update(extra)

    print()
    C.print_table(results, COLUMNS, title=f"MAE pretraining step (shared loop), {device}, MFU vs "
                                          f"{peak['peak_tflops']:.4g} TFLOP/s ({peak['peak_source']}); memory = "
                                          f"{results[0]['peak_mem_kind']}")
    if "ours_over_hf" in extra:
        print(f"ours / HF images/s: {extra['ours_over_hf']:.3f}", flush=True)
    payload = C.report("pretrain_step", args, device, peak, results)
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
