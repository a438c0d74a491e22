"""MAE pretraining on WebDataset shards with Accelerate (one process, DDP or DeepSpeed ZeRO).

    python pretrain/mae.py                                   # small MAE on the shipped sample, a few CPU minutes
    accelerate launch pretrain/mae.py pretrain/configs/cifar10.yaml data.train=/data/cifar10-wds
    accelerate launch --config_file launch/accelerate/zero2.yaml pretrain/mae.py pretrain/configs/in1k_vit_base.yaml

Re-running the same command resumes from the newest complete checkpoint in `run.output_dir` (model, optimizer,
GradScaler, RNG states and the data-stream position). SIGTERM/SIGUSR1 save a checkpoint at the next step boundary
and exit 0. Writes RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/, reconstructions/, reconstructions.png,
encoder.safetensors (timm key names), mae.safetensors (full MAE, our key names)}.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `python pretrain/mae.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import save_file
from tqdm import tqdm

from data.eval_stream import build_eval_loader
from data.info import resolve
from data.train_stream import build_train_loader
from data.transforms import eval_transform, pretrain_transform
from launch.accel import build_accelerator, input_dtype, zero_stage
from launch.checkpoint import CheckpointManager, ResumeMismatch, export_state_dict, frozen_parameters, model_fingerprint
from launch.config import parse_cli, save_config, to_dict
from launch.metrics import MetricsLogger
from launch.param_groups import param_groups
from launch.recon_grid import save_reconstruction_grid
from launch.schedule import apply_lr, lr_at
from launch.signals import StopFlag
from models.convert import save_encoder, to_encoder_state_dict
from models.flops import mae_flops_per_image
from models.variants import create_mae
from pretrain.config import PretrainConfig

PROG = "pretrain/mae.py"
REPO = Path(__file__).resolve().parents[1]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


# ------------------------------------------------------------------------------------------------- helpers


def _local_spec(spec: str) -> str:
    """Relative dataset folders are tried from the current directory, then from the repository root."""
    head = spec.split(":")[0]
    if spec and not Path(head).exists() and (REPO / head).exists():
        return str(REPO / spec)
    return spec


def build_model(cfg: PretrainConfig):
    m = cfg.model
    return create_mae(m.name, img_size=m.img_size, mask_ratio=m.mask_ratio, mask_type=m.mask_type,
                      norm_pix_loss=m.norm_pix_loss, **m.overrides)


def recon_spec(cfg: PretrainConfig) -> str:
    """The grid's images: `data.recon`, else a val/test split next to the train split, else train."""
    if cfg.data.recon:
        return _local_spec(cfg.data.recon)
    train = _local_spec(cfg.data.train)
    folder = train.rsplit(":", 1)[0] if ":" in train and Path(train.rsplit(":", 1)[0]).is_dir() else train
    if Path(folder).is_dir():
        for split in ("val", "test"):
            try:
                resolve(f"{folder}:{split}")
                return f"{folder}:{split}"
            except Exception:  # no such split: try the next
                continue
    return train


def fixed_images(cfg: PretrainConfig) -> torch.Tensor | None:
    """The first `vis.num_images` images of the recon split, deterministic (eval transform, no augmentation)."""
    n = cfg.vis.num_images
    if n == 0:
        return None
    tf = eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std, crop_pct=1.0)
    loader = build_eval_loader(recon_spec(cfg), batch_size=n, transform=tf, rank=0, world_size=1, num_workers=0)
    for batch in loader:
        return batch["image"][batch["valid"]][:n].float()
    return None


def grid(model, images, path: Path, cfg: PretrainConfig) -> None:
    """Write a reconstruction grid without touching the training RNG streams."""
    was_training = model.training
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), torch.no_grad():
        save_reconstruction_grid(model, images, path, cfg.data.mean, cfg.data.std, cfg.model.mask_ratio, cfg.vis.seed)
    model.train(was_training)


def summary(cfg, accelerator, model, info, global_batch, peak_lr, start_step) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    flops = mae_flops_per_image(model, cfg.model.mask_ratio)
    stage = zero_stage(accelerator)
    images = cfg.run.steps * global_batch
    epochs = f" = {images / info.num_samples:.2f} epochs" if info.num_samples else ""
    lines = [
        f"model       {cfg.model.name}: {n_params / 1e6:.2f}M parameters ({n_enc / 1e6:.2f}M encoder), "
        f"img {cfg.model.img_size}px, patch {model.patch_size}, mask {cfg.model.mask_ratio} ({cfg.model.mask_type}), "
        f"norm_pix_loss {cfg.model.norm_pix_loss}",
        f"FLOPs/image forward {flops['forward'] / 1e9:.3f} G, train {flops['train'] / 1e9:.3f} G",
        f"data        {cfg.data.train}: {info.num_samples if info.num_samples is not None else 'unknown'} images, "
        f"{len(info.urls)} shards",
        f"batch       {cfg.data.batch_size}/process x {accelerator.num_processes} processes x "
        f"{cfg.optim.grad_accum_steps} accumulation = {global_batch} global",
        f"schedule    {cfg.run.steps} steps ({images} images{epochs}), peak lr {peak_lr:.3g} "
        f"(blr {cfg.optim.blr:g} x {global_batch}/256{' overridden' if cfg.optim.lr is not None else ''}), "
        f"warmup {cfg.optim.warmup_steps}, min_lr {cfg.optim.min_lr:g}, wd {cfg.optim.weight_decay}",
        f"runtime     {accelerator.distributed_type.value}, world size {accelerator.num_processes}, device "
        f"{accelerator.device}, precision {accelerator.mixed_precision}, DeepSpeed ZeRO stage {stage if stage is not None else '-'}",
        f"run dir     {cfg.run.output_dir}" + (f" (resuming at step {start_step})" if start_step else ""),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def train(cfg: PretrainConfig) -> dict:
    """Pretrain; returns a small summary dict (final step, last logged loss, paths)."""
    run_dir = Path(cfg.run.output_dir)
    accelerator = build_accelerator(cfg.run, cfg.optim, cfg.data.batch_size)
    is_main = accelerator.is_main_process
    device = accelerator.device
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    stop = StopFlag()

    set_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    fingerprint = model_fingerprint(model)
    frozen = frozen_parameters(model)  # fp32 sin-cos tables (DeepSpeed bf16 keeps no fp32 copy of frozen tensors)
    info = resolve(_local_spec(cfg.data.train))

    world = accelerator.num_processes
    accum = cfg.optim.grad_accum_steps
    global_batch = cfg.data.batch_size * world * accum
    peak_lr = cfg.optim.peak_lr(global_batch)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    fused = {"fused": True} if device.type == "cuda" and not deepspeed else {}
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps, **fused)
    if cfg.run.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    config_dict = to_dict(cfg)
    ckpt = CheckpointManager(accelerator, run_dir, keep=cfg.run.keep_checkpoints)
    state = ckpt.load_latest(expect_fingerprint=fingerprint, config=config_dict) if cfg.run.resume else None
    start_step = int(state["step"]) if state else 0
    batches = int(state["batches"]) if state else 0
    nonfinite_total = int(state.get("nonfinite_total", 0)) if state else 0
    nonfinite_run = int(state.get("nonfinite_consecutive", 0)) if state else 0
    if state is None:  # per-rank masking noise; on resume the RNG states come from the checkpoint
        set_seed(cfg.run.seed + accelerator.process_index)

    metrics = MetricsLogger(run_dir, accelerator)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if state is not None:
            metrics.truncate_after(start_step)
        print(summary(cfg, accelerator, raw_model, info, global_batch, peak_lr, start_step), flush=True)
    tracker_config = {k: v for k, v in _flat(config_dict).items() if isinstance(v, (int, float, str, bool))}
    wandb = "wandb" in cfg.run.trackers
    accelerator.init_trackers(cfg.run.wandb_project if wandb else "pretrain", config=tracker_config,
                              init_kwargs={"wandb": {"name": run_dir.name}} if wandb else {})

    transform = pretrain_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std)
    loader_kwargs = {} if cfg.data.shuffle_buffer is None else {"shuffle_buffer": cfg.data.shuffle_buffer}
    loader = build_train_loader(_local_spec(cfg.data.train), batch_size=cfg.data.batch_size, transform=transform,
                                seed=cfg.run.seed, rank=accelerator.process_index, world_size=world,
                                num_workers=cfg.data.num_workers, start_batch=batches, **loader_kwargs)
    if state is not None and isinstance(state.get("loader"), dict):
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as exc:
            if is_main:
                print(f"warning: {exc}; continuing from batch {batches}, but not exactly where the stream left off",
                      flush=True)
    with torch.random.fork_rng(devices=[]):  # reading the grid's images must not move the training RNG
        vis_images = fixed_images(cfg) if is_main and not _zero3(accelerator) else None
    if vis_images is not None:
        vis_images = vis_images.to(device)

    dtype = input_dtype(accelerator)
    model.train()
    step = start_step
    corrupt_base = int(state.get("n_corrupt", 0)) if state else 0
    n_corrupt = 0  # this rank's count since start (the loader's running total)
    log_loss = torch.zeros((), device=device)  # summed on device; read at log steps only
    log_steps = 0
    last = {"loss": math.nan}
    t_log = time.perf_counter()
    stream = iter(loader)
    stopped_by = None
    bar = tqdm(total=cfg.run.steps, initial=start_step, disable=not (is_main and cfg.run.progress),
               desc="pretrain", dynamic_ncols=True)

    while step < cfg.run.steps:
        lr = lr_at(step, peak_lr=peak_lr, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.run.steps,
                   min_lr=cfg.optim.min_lr)
        apply_lr(optimizer, lr)
        step_loss = torch.zeros((), device=device)
        skip = False
        for micro in range(accum):
            batch = next(stream)
            batches += 1
            n_corrupt = int(batch.get("n_corrupt", 0))
            images = batch["image"].to(device, dtype=dtype, non_blocking=True)
            with accelerator.accumulate(model):
                loss, _, _ = model(images)
                step_loss += loss.detach().float() / accum
                if micro == accum - 1:
                    # one flag per optimizer step, agreed by all ranks: skip the update when any loss is non-finite
                    bad = accelerator.reduce((~torch.isfinite(step_loss)).float(), reduction="sum")
                    skip = bool(bad.item() > 0)
                if not skip:
                    accelerator.backward(loss)
        if skip:
            optimizer.zero_grad(set_to_none=True)
            nonfinite_total += 1
            nonfinite_run += 1
            if nonfinite_run >= cfg.run.max_nonfinite:
                raise NonFiniteLossError(
                    f"{nonfinite_run} consecutive non-finite losses (last at step {step}); the updates were skipped. "
                    f"Try a lower learning rate (optim.blr), run.precision=bf16 instead of fp16, or gradient clipping "
                    f"(optim.clip_grad=1.0); resume from the last checkpoint in {run_dir / 'checkpoints'}"
                )
        else:
            nonfinite_run = 0
            if cfg.optim.clip_grad and not deepspeed:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log_loss += step_loss
            log_steps += 1
        step += 1
        bar.update(1)

        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            mean_loss = accelerator.reduce(log_loss, reduction="mean").item() / max(1, log_steps)
            corrupt = int(accelerator.reduce(torch.tensor(float(n_corrupt), device=device), reduction="sum").item())
            elapsed = time.perf_counter() - t_log
            n_steps = cfg.run.log_every if step % cfg.run.log_every == 0 else step % cfg.run.log_every
            ips = n_steps * global_batch / max(elapsed, 1e-9)
            last = {"loss": mean_loss if log_steps else math.nan, "lr": lr, "images_per_sec": ips,
                    "n_corrupt": corrupt_base + corrupt, "n_nonfinite": nonfinite_total, "batches": batches,
                    "epoch": step * global_batch / info.num_samples if info.num_samples else None}
            metrics.log(step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            if is_main and not cfg.run.progress:  # plain log lines for files and pipes
                print(f"step {step}/{cfg.run.steps} loss {last['loss']:.5f} lr {lr:.3e} images/s {ips:.1f}", flush=True)
            log_loss.zero_()
            log_steps = 0
            t_log = time.perf_counter()
            if stopped_by is None and stop.should_stop(accelerator):
                stopped_by = stop.received or "a signal on another rank"

        if is_main and vis_images is not None and cfg.vis.every and step % cfg.vis.every == 0:
            grid(raw_model, vis_images.to(dtype), run_dir / "reconstructions" / f"step_{step:06d}.png", cfg)

        save_now = cfg.run.save_every and step % cfg.run.save_every == 0
        if world == 1 and stopped_by is None and stop.should_stop():
            stopped_by = stop.received
        if save_now or step == cfg.run.steps or stopped_by:
            corrupt = corrupt_base + int(accelerator.reduce(torch.tensor(float(n_corrupt), device=device), "sum").item())
            ckpt.save(step, {"batches": batches, "n_corrupt": corrupt, "nonfinite_total": nonfinite_total,
                             "nonfinite_consecutive": nonfinite_run, "config": config_dict,
                             "fingerprint": fingerprint, "loader": getattr(loader, "state_dict", dict)()})
        if stopped_by:
            break
    bar.close()

    result = {"step": step, "loss": last["loss"], "run_dir": str(run_dir), "stopped_by": stopped_by}
    if stopped_by:
        if is_main:
            print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {ckpt.path_for(step)}. "
                  f"Re-run the same command to resume.", flush=True)
        metrics.close()
        stop.restore()
        return result

    final = export_state_dict(accelerator, model, ckpt.path_for(step), frozen=frozen)
    if is_main:
        save_file(final, str(run_dir / "mae.safetensors"))
        save_encoder(to_encoder_state_dict(final), run_dir / "encoder.safetensors")
        if cfg.vis.num_images:
            images = vis_images if vis_images is not None else fixed_images(cfg)
            if images is not None:
                fresh = build_model(cfg)
                fresh.load_state_dict(final)
                grid(fresh.to(images.device), images.to(device), run_dir / "reconstructions.png", cfg)
        print(f"done: step {step}, loss {last['loss']:.4f}; weights in {run_dir / 'encoder.safetensors'} "
              f"and {run_dir / 'mae.safetensors'}", flush=True)
        result.update(encoder=str(run_dir / "encoder.safetensors"), mae=str(run_dir / "mae.safetensors"))
    accelerator.wait_for_everyone()
    metrics.close()
    stop.restore()
    return result


def _zero3(accelerator) -> bool:
    return zero_stage(accelerator) == 3


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(PretrainConfig, argv, PROG)
    try:
        return train(cfg)
    except (NonFiniteLossError, ResumeMismatch) as exc:
        raise SystemExit(f"{PROG}: {exc}") from None


if __name__ == "__main__":
    main()
