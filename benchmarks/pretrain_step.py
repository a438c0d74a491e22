"""MAE pretraining step throughput on synthetic on-device input, ours side by side with Hugging Face ViTMAE.

    python benchmarks/pretrain_step.py --variant mae_vit_base_patch16_dec512d8b --batch 256 --precision bf16 \
        [--compile] [--no-sdpa] [--fused-adamw on|off] [--grad-ckpt] [--no-hf] --out results.json
    python benchmarks/pretrain_step.py --device cpu --variant mae_vit_tiny_patch4_dec128d2b --batch 64   # CPU

One step = forward (random masking drawn inside, as in training) + backward + AdamW step + zero_grad, with the
library's parameter groups (launch/param_groups.py), autocast over fp32 weights for bf16/fp16 (GradScaler for
fp16). Reported per model: images/s and step time (median of the timed steps), peak memory, the analytic training
FLOPs per image (models/flops.py) next to what torch's FlopCounterMode counts for one forward+backward, achieved
TFLOP/s and MFU. The Hugging Face `ViTMAEForPreTraining` gets the same architecture (ViTMAEConfig built from our
model), our initial weights (models/convert.to_hf_state_dict), the same batch, precision and optimizer; a
same-noise forward checks that both compute the same loss before timing. Skipped with --no-hf or when
transformers is not installed.
--rounds R (> 1) keeps both models resident and times them in alternating blocks (for a shared, loaded CPU);
--compile-vs-eager times our model eager and compiled the same way (no HF).
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
from launch.param_groups import param_groups  # noqa: E402
from models.convert import to_hf_state_dict  # noqa: E402
from models.flops import mae_flops_per_image  # noqa: E402
from models.variants import create_mae  # noqa: E402

COLUMNS = [("impl", "impl"), ("variant", "variant"), ("batch", "batch"), ("precision", "prec"),
           ("compile", "compile"), ("sdpa", "sdpa"), ("fused_adamw", "fused AdamW"), ("grad_ckpt", "ckpt"),
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
    p.add_argument("--rounds", type=int, default=1,
                   help="> 1: keep both models resident and time them in alternating blocks of steps (fairer on a "
                        "shared, loaded CPU; memory is then reported for the two together)")
    p.add_argument("--compile-vs-eager", action="store_true",
                   help="time our model eager and compiled in one process (alternating with --rounds); no HF")
    return p


# ------------------------------------------------------------------------------------------------- models


def build_mae(args, device: torch.device):
    overrides = C.parse_overrides(args.override)
    overrides.setdefault("norm_pix_loss", args.norm_pix)
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    torch.manual_seed(args.seed)
    model = create_mae(args.variant, **overrides).to(device)
    C.set_sdpa(model, not args.no_sdpa)
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
        decoder_num_attention_heads=dec["num_heads"], decoder_intermediate_size=int(dec["embed_dim"] * dec["mlp_ratio"]),
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


def make_train_step(model, loss_of, optimizer, batches, device: torch.device, precision: str, holder: dict):
    """step(i): one training step on batches[i % len]; the last loss tensor is kept in holder["loss"]."""
    scaler = C.grad_scaler(device, precision)

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        with C.autocast(device, precision):
            loss = loss_of(model, x)
        C.optimizer_step(loss, optimizer, scaler)
        holder["loss"] = loss.detach()

    return step


def counted_flops_per_image(model, loss_of, shape, device: torch.device, precision: str, n: int = 4) -> float:
    """FlopCounterMode over one forward+backward of n images (eager model), per image; gradients discarded."""
    x = torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(7)).to(device)

    def fwd_bwd():
        with C.autocast(device, precision):
            loss = loss_of(model, x)
        loss.backward()

    total = C.count_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return total / n


def prepare(impl: str, model, loss_of, args, device, shape, compile: bool | None = None) -> dict:
    """Optimizer, counted FLOPs (eager), the (compiled) step function and its inputs for one model."""
    compile = args.compile if compile is None else compile
    optimizer = C.adamw(param_groups(model, weight_decay=0.05), device, args.fused_adamw)
    counted = counted_flops_per_image(model, loss_of, shape, device, args.precision)
    runner = torch.compile(model) if compile else model
    batches = C.random_batches(args.input_sets, shape, device, args.seed)
    holder: dict = {}
    step = make_train_step(runner, loss_of, optimizer, batches, device, args.precision, holder)
    return {"impl": impl, "step": step, "counted": counted, "holder": holder, "compile": compile,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def record(prep: dict, timing: dict, mem, args, device, peak: dict, analytic: dict) -> dict:
    return {
        "impl": prep["impl"], "variant": args.variant, "batch": args.batch, "precision": args.precision,
        "compile": prep["compile"], "sdpa": not args.no_sdpa,
        "fused_adamw": C.use_fused_adamw(device, args.fused_adamw),
        "grad_ckpt": args.grad_ckpt, "device": str(device), "params_m": prep["params_m"],
        "train_gflops_analytic": analytic["train"] / 1e9, "train_gflops_counted": prep["counted"] / 1e9,
        "counted_over_analytic": prep["counted"] / analytic["train"],
        **timing, "step_ms_range": f"{timing['step_ms_min']:.4g}-{timing['step_ms_max']:.4g}",
        **C.throughput(timing, args.batch, analytic["train"], peak),
        "peak_mem_gb": mem.peak_bytes / 2**30, "peak_mem_kind": mem.kind,
        "loss_last": float(prep["holder"]["loss"]),
    }


def bench_model(impl: str, model, loss_of, args, device, peak: dict, analytic: dict, shape) -> dict:
    """Time one model's training step on its own; returns the result record."""
    prep = prepare(impl, model, loss_of, args, device, shape)
    with C.PeakMemory(device) as mem:
        timing = C.time_steps(prep["step"], steps=args.steps, warmup=args.warmup, device=device)
    rec = record(prep, timing, mem, args, device, peak, analytic)
    del prep
    C.release(device)
    return rec


def bench_interleaved(models: dict, args, device, peak: dict, analytic: dict, shape) -> list[dict]:
    """Both models resident, timed in alternating blocks (--rounds); memory is then the two together.
    `models`: {name: (model, loss_of, compile or None for --compile)}."""
    preps = {impl: prepare(impl, model, loss_of, args, device, shape, compile)
             for impl, (model, loss_of, compile) in models.items()}
    with C.PeakMemory(device) as mem:
        timings = C.time_interleaved({k: p["step"] for k, p in preps.items()}, steps=args.steps,
                                     warmup=args.warmup, rounds=args.rounds, device=device)
    recs = [record(preps[k], timings[k], mem, args, device, peak, analytic) for k in preps]
    for r in recs:
        r["peak_mem_kind"] += " (both models resident)"
    return recs


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_args(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    device = C.resolve_device(args.device)
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
    if not args.no_hf and not args.compile_vs_eager:
        try:
            hf = build_hf(mae, args, device)
            extra = agreement(mae, hf, shape, device)
            print(f"HF ViTMAE loaded with our weights: |loss diff| {extra['hf_loss_abs_diff']:.2e}, "
                  f"max |pred diff| {extra['hf_pred_max_abs_diff']:.2e}", flush=True)
        except ImportError as exc:
            print(f"skipping the Hugging Face comparison: {exc}", flush=True)
            extra = {"hf_skipped": str(exc)}
    if args.compile_vs_eager:  # the same model eager and compiled (separate optimizers), alternating
        results = bench_interleaved({"tessera eager": (mae, ours_loss, False), "tessera compiled": (mae, ours_loss, True)},
                                    args, device, peak, analytic, shape)
        extra["compiled_over_eager"] = results[1]["images_per_sec"] / results[0]["images_per_sec"]
        del mae
        C.release(device)
    elif hf is not None and args.rounds > 1:
        results = bench_interleaved({"tessera": (mae, ours_loss, None), "hf_vitmae": (hf, hf_loss, None)}, args,
                                    device, peak, analytic, shape)
        del mae, hf
        C.release(device)
    else:
        results = [bench_model("tessera", mae, ours_loss, args, device, peak, analytic, shape)]
        del mae
        C.release(device)
        if hf is not None:
            results.append(bench_model("hf_vitmae", hf, hf_loss, args, device, peak, analytic, shape))
            del hf
            C.release(device)
    if len(results) == 2 and not args.compile_vs_eager:
        extra["ours_over_hf"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
    results[0].update(extra)

    print()
    C.print_table(results, COLUMNS, title=f"MAE pretraining step, {device}, MFU vs {peak['peak_tflops']:.4g} "
                                          f"TFLOP/s ({peak['peak_source']}); memory = {results[0]['peak_mem_kind']}")
    if "ours_over_hf" in extra:
        print(f"ours / HF images/s: {extra['ours_over_hf']:.3f}", flush=True)
    if "compiled_over_eager" in extra:
        print(f"compiled / eager images/s: {extra['compiled_over_eager']:.3f} (first compiled step "
              f"{results[1]['first_step_s']:.1f} s, compilation included)", flush=True)
    payload = C.report("pretrain_step", args, device, peak, results)
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
