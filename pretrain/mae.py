"""MAE pretraining on WebDataset shards with Accelerate (one process, DDP or DeepSpeed ZeRO).

    python pretrain/mae.py                                   # small MAE on the shipped sample, a few CPU minutes
    accelerate launch pretrain/mae.py pretrain/configs/cifar10.yaml data.train=/data/cifar10-wds
    accelerate launch --config_file launch/accelerate/zero2.yaml pretrain/mae.py pretrain/configs/in1k_vit_base.yaml

config -> model -> loader -> step function -> the shared loop (`launch/loop.py`) -> export; the run around it (start-up,
checkpoints, resume, run record) is `launch/session.py`'s. Re-running the same command resumes from the newest complete
checkpoint in `run.output_dir` (model, optimizer, GradScaler, RNG states, the data-stream position, data2vec's
teacher). SIGTERM/SIGUSR1 save a checkpoint at the next step boundary and exit 0. Writes RUN_DIR/{config.yaml,
run.json, metrics.jsonl, checkpoints/, reconstructions/, reconstructions.png, encoder.safetensors (timm key names),
mae.safetensors (full MAE, our key names)}.

`model.objective` picks what is learned (models/objectives.py): `mae` (default), `simmim` or `data2vec`;
`model.target` pixels or hog for mae and simmim. Every objective exports encoder.safetensors (a timm ViT); the full
model goes to `<objective>.safetensors` (mae.safetensors, simmim.safetensors, data2vec.safetensors: the student;
the data2vec EMA teacher's encoder also to teacher_encoder.safetensors). Reconstruction grids need pixel predictions
(mae or simmim with pixel targets); other runs skip them and say so.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from core.errors import ConfigError
from data.device_dataset import build_device_loader
from data.device_input import device_batches
from data.first_images import first_images
from data.info import DatasetError, resolve
from data.norm_stats import norm_stats
from data.synthetic import SyntheticLoader
from data.train_stream import build_train_loader
from data.transforms import eval_transform, pretrain_transform, uint8_output
from launch import run_files
from launch.batch_memory import check_micro_batch
from launch.checkpoint import export_state_dict, frozen_parameters, model_fingerprint
from launch.config import parse_cli
from launch.corrupt_count import CorruptCount
from launch.errors import cli
from launch.knn_monitor import build_knn_monitor, knn_summary, neighbour_split
from launch.loop import Hook, TrainLoop
from launch.param_groups import build_adamw, param_groups
from launch.session import Runtime, Session, start_run
from launch.signals import signals_deferred
from launch.warm_start import set_layer_norm_eps, warm_start
from models.compile import compile_blocks, compile_enabled
from models.convert import save_encoder, save_weights, to_encoder_state_dict
from models.data2vec import EmaTeacher
from models.masking import sample_noise
from models.objectives import create_pretrainer, predicts_pixels, pretrain_flops_per_image
from pictures.knn_curve import save_knn_curve_of_run
from pictures.recon_grid import save_reconstruction_grid
from pretrain.config import PretrainConfig

PROG = "pretrain/mae.py"


def build_model(cfg: PretrainConfig):
    m = cfg.model.resolved()  # the objective's masking and target defaults
    try:
        return create_pretrainer(m.objective, m.name, target=m.target, norm_pix_loss=m.norm_pix_loss,
                                 hog_cell=cfg.hog.cell, hog_bins=cfg.hog.bins, loss_beta=cfg.data2vec.loss_beta,
                                 img_size=m.img_size, mask_ratio=m.mask_ratio, mask_type=m.mask_type,
                                 mask_min_block=m.mask_min_block, mask_max_block=m.mask_max_block,
                                 **{**m.overrides, **({"in_chans": m.in_chans} if m.in_chans else {})})
    except ValueError as exc:  # a combination of model/hog keys the model cannot be built with
        raise ConfigError(f"model: {exc}") from None
    except TypeError as exc:  # a typo under model.overrides reaches the constructor as a keyword
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown is None:
            raise
        raise ConfigError(f"unknown config key 'model.overrides.{unknown.group(1)}': {m.name} has no such "
                          f"constructor argument (see models/variants.py)") from None


def build_teacher(cfg: PretrainConfig, model) -> EmaTeacher | None:
    """data2vec's EMA teacher (a copy of the student's encoder), or None for the other objectives."""
    if cfg.model.objective != "data2vec":
        return None
    d = cfg.data2vec
    if d.top_k > len(model.encoder.blocks):
        raise ConfigError(f"data2vec.top_k={d.top_k} exceeds the encoder depth {len(model.encoder.blocks)}")
    return EmaTeacher(model.encoder, top_k=d.top_k, decay=d.ema_decay, end_decay=d.ema_end_decay,
                      schedule=d.ema_schedule, total_steps=cfg.run.steps)


def with_dataset_defaults(cfg: PretrainConfig, say: bool = True) -> PretrainConfig:
    """The config with the objective's defaults (`ModelConfig.resolved`), `model.in_chans` and `data.mean`/`data.std`
    filled in where None: from the training split's dataset.json (`channels`, `mean`, `std`, written by
    data/make_shards.py), else 3 channels and `data/norm_stats.py`'s fallback. What config.yaml records."""
    try:
        meta = resolve(cfg.data.train).meta or {}
    except DatasetError as exc:
        raise ConfigError(f"data.train: {exc}") from None
    m, d = cfg.model.resolved(), cfg.data
    chans = int(m.in_chans or m.overrides.get("in_chans") or meta.get("channels") or 3)
    if meta.get("channels") and int(meta["channels"]) != chans:
        raise ConfigError(f"model.in_chans={chans} but the images of data.train={cfg.data.train} have "
                          f"{meta['channels']} channels (its dataset.json); leave model.in_chans unset to follow the "
                          f"data, or give data of {chans} channels")
    mean, std, source = norm_stats(d.mean, d.std, meta, chans)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != chans:
            raise ConfigError(f"{key} has {len(values)} values but the images have {chans} channels (model.in_chans)")
    if say and source == "0.5":
        print(f"note: no per-channel statistics for {cfg.data.train} in dataset.json (write the shards with "
              f"data/make_shards.py); normalising with mean 0.5, std 0.5", flush=True)
    vis = cfg.vis
    if chans not in (1, 3) and vis.num_images:
        vis = replace(vis, num_images=0)
        if say:
            print(f"note: reconstruction grids draw 1- or 3-channel images; none for {chans} channels", flush=True)
    return replace(cfg, model=replace(m, in_chans=chans), data=replace(d, mean=mean, std=std), vis=vis)


def train_transform(cfg: PretrainConfig, output: str = "float"):
    """The pretraining augmentation (`data.augment`, `data.crop_scale`, `data.hflip`); "uint8" output for 8-bit RGB
    (normalised on the device by `device_batches`)."""
    d = cfg.data
    if d.augment == "none":
        return eval_transform(cfg.model.img_size, d.mean, d.std, output=output)
    return pretrain_transform(cfg.model.img_size, d.mean, d.std, scale=tuple(d.crop_scale), hflip=d.hflip,
                              output=output)


def mask_noise_fn(raw):
    """Each sample's masking noise from its own seed, made where the sample is read (the training stream's
    `sample_fn`): a sample gets the same mask whatever the world size, worker count or micro-batch."""
    gh, gw = raw.grid_size
    return partial(sample_noise, grid_h=gh, grid_w=gw, mask_type=raw.mask_type, mask_ratio=raw.mask_ratio,
                   min_block=raw.mask_min_block, max_block=raw.mask_max_block)


def build_loader(cfg: PretrainConfig, rt: Runtime, info, raw):
    """The training loader: shards through worker processes (`data.loader=stream`), the whole split on the device as
    uint8 (`device`, CIFAR-scale data; crop and flip on the device), or random images (`synthetic`, no I/O). The
    stream and the device loader carry each sample's masking noise (`mask_noise_fn`)."""
    d = cfg.data
    uint8 = uint8_output(info.meta, cfg.model.in_chans) == "uint8" or d.loader != "stream"
    check_micro_batch(rt.micro_batch, info.num_samples if d.loader != "synthetic" else None,
                      (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size),
                      d.num_workers if d.loader == "stream" else 0, world_size=rt.world,
                      dtype="uint8" if uint8 else "float32")
    if d.loader == "synthetic":
        return SyntheticLoader(batch_size=rt.micro_batch, channels=cfg.model.in_chans, img_size=cfg.model.img_size,
                               num_classes=info.num_classes or 10, seed=cfg.run.seed, rank=rt.rank,
                               world_size=rt.world)
    if d.loader == "device":
        if d.augment == "none" or cfg.model.in_chans != 3:
            raise ConfigError("data.loader=device crops 8-bit RGB images on the device: it needs data.augment=crop "
                              "and 3 channels")
        return build_device_loader(d.train, batch_size=rt.micro_batch, img_size=cfg.model.img_size,
                                   device=rt.device, seed=cfg.run.seed, rank=rt.rank, world_size=rt.world,
                                   scale=tuple(d.crop_scale), hflip=d.hflip, sample_fn=mask_noise_fn(raw))
    kwargs = {} if d.shuffle_buffer is None else {"shuffle_buffer": d.shuffle_buffer}
    pin = d.pin_memory if d.pin_memory is not None else rt.device.type == "cuda"
    return build_train_loader(d.train, batch_size=rt.micro_batch,
                              transform=train_transform(cfg, uint8_output(info.meta, cfg.model.in_chans)),
                              seed=cfg.run.seed, rank=rt.rank, world_size=rt.world, num_workers=d.num_workers,
                              pin_memory=pin, sample_fn=mask_noise_fn(raw), **kwargs)


def plan_loader(cfg: PretrainConfig, place):
    """The training loader `cfg` gives one process (`place`: micro_batch, rank, world, device), built without an
    accelerator (the mask geometry from the model on the meta device), or None for synthetic batches: what `--plan`
    times (launch/plan.py)."""
    if cfg.data.loader == "synthetic":
        return None
    cfg = with_dataset_defaults(cfg, say=False)
    with torch.device("meta"):
        raw = build_model(cfg)
    return build_loader(cfg, place, resolve(cfg.data.train), raw)


def fixed_images(cfg: PretrainConfig, device) -> torch.Tensor | None:
    """The first `vis.num_images` images of `vis.images` (else the val/test split next to data.train, else
    data.train), normalised, deterministic (eval transform)."""
    n = cfg.vis.num_images
    if n == 0:
        return None
    tf = eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std, crop_pct=1.0)
    spec = cfg.vis.images or neighbour_split(cfg.data.train) or cfg.data.train
    images = first_images(spec, n, tf)  # reads only the shard(s) holding them (remote data too)
    return None if images is None else images.to(device)


def grid(model, images, path: Path, cfg: PretrainConfig) -> None:
    """Write a reconstruction grid without touching the training RNG streams."""
    was_training = model.training
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), torch.no_grad():
        save_reconstruction_grid(model, images, path, cfg.data.mean, cfg.data.std, cfg.model.mask_ratio, cfg.vis.seed)
    model.train(was_training)


def summary(cfg, rt: Runtime, model, info, peak_lr, flops, start_step) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    images = cfg.run.steps * rt.global_batch
    epochs = f" = {images / info.num_samples:.2f} epochs" if info.num_samples else ""
    return "\n".join([
        f"model       {cfg.model.name}: {n_params / 1e6:.2f}M parameters ({n_enc / 1e6:.2f}M encoder), "
        f"img {cfg.model.img_size}px, patch {model.patch_size}, mask {cfg.model.mask_ratio} ({cfg.model.mask_type}), "
        f"norm_pix_loss {cfg.model.norm_pix_loss}, objective {cfg.model.objective}"
        + (f", target {cfg.model.target}" if cfg.model.target else ""),
        f"FLOPs/image forward {flops['forward'] / 1e9:.3f} G, train {flops['train'] / 1e9:.3f} G",
        f"data        {cfg.data.train}: {info.num_samples if info.num_samples is not None else 'unknown'} images, "
        f"{len(info.urls)} shards ({cfg.data.loader} loader)",
        f"batch       micro {rt.micro_batch}/process x {rt.world} processes x {rt.accum} accumulation = global "
        f"{rt.global_batch}",
        f"schedule    {cfg.run.steps} steps ({images} images{epochs}), peak lr {peak_lr:.3g} "
        f"(blr {cfg.optim.blr:g} x {rt.global_batch}/256{' overridden' if cfg.optim.lr is not None else ''}), "
        f"warmup {cfg.optim.warmup_steps}, min_lr {cfg.optim.min_lr:g}, wd {cfg.optim.weight_decay}",
        f"runtime     {rt.accelerator.distributed_type.value}, world size {rt.world}, device {rt.device}, precision "
        f"{rt.accelerator.mixed_precision}, DeepSpeed ZeRO stage {rt.zero_stage if rt.zero_stage is not None else '-'}",
        f"run dir     {cfg.run.output_dir}" + (f" (resuming at step {start_step})" if start_step else ""),
    ])


def knn_hook(cfg: PretrainConfig, rt: Runtime, raw_model) -> tuple[list[Hook], object]:
    """The k-NN monitor as a loop hook (every `run.eval_every` steps and at the end, in the step's metrics record)
    and the monitor, or none: `knn.enabled=false`, or no labelled bank/query split (said in one line)."""
    if not cfg.knn.enabled:
        return [], None
    k = cfg.knn
    monitor, note = build_knn_monitor(
        bank=k.bank, query=k.query, train=cfg.data.train, accelerator=rt.accelerator,
        encoder=lambda: raw_model.encoder, img_size=cfg.model.img_size, mean=cfg.data.mean, std=cfg.data.std,
        bank_size=k.bank_size, query_size=k.query_size, batch_size=cfg.data.eval_batch,
        num_workers=cfg.data.num_workers if cfg.data.loader != "device" else 0, dtype=rt.dtype, k=k.k,
        temperature=k.temperature, pool=cfg.model.pool)
    rt.say(note)
    return ([Hook(cfg.run.eval_every, monitor, at_end=True, merge=True)] if monitor is not None else []), monitor


def knn_baselines(monitor, session: Session, raw) -> dict:
    """The monitor's yardsticks, on the same bank and queries: the encoder at initialisation and raw pixels; computed
    once by a fresh run (logged at step 0), read back from RUN_DIR/knn_baselines.json by a resumed one."""
    if monitor is None:
        return {}
    values = monitor.baselines(session.run_dir, None if session.resumed else raw.encoder)
    if not session.resumed:
        session.log(0, values)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if v is not None)
    session.rt.say(f"knn: baselines {shown}")
    return values


def knn_end(monitor, session: Session, baselines: dict) -> None:
    """At the end: one line saying how far the encoder's features are from each baseline, and the k-NN curve with
    the baselines drawn as lines (RUN_DIR/knn_curve.png)."""
    if monitor is None or monitor.last_top1 is None or not session.rt.is_main:
        return
    session.rt.say(knn_summary(monitor.last_top1, monitor.init_top1, baselines.get("knn_top1_pixels")))
    session.rt.say(f"knn: curve in {save_knn_curve_of_run(session.run_dir)}")


def build(cfg: PretrainConfig, rt: Runtime):
    """The model (warm-started when asked), data2vec's teacher, and what the run records of the model before
    `prepare`: its shape fingerprint and the fp32 frozen tables."""
    model = build_model(cfg)
    if cfg.model.layer_norm_eps is not None:
        set_layer_norm_eps(model, cfg.model.layer_norm_eps)
    if cfg.model.init_from:  # continued pretraining: starting weights, fresh optimizer and schedule
        rt.say(warm_start(model, cfg.model.init_from, cfg.model.layer_norm_eps))
    teacher = build_teacher(cfg, model)  # data2vec: the EMA teacher, built before compile and prepare
    if teacher is not None and rt.sharded:
        raise ConfigError("model.objective=data2vec needs whole parameters on every rank for its EMA teacher; "
                          "use DDP or ZeRO-2 (launch/accelerate/zero2.yaml), not ZeRO-3 or FSDP2")
    fingerprint = model_fingerprint(model)
    frozen = frozen_parameters(model)  # fp32 sin-cos tables (DeepSpeed bf16 keeps no fp32 copy of frozen tensors)
    optimizer = build_adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim,
                            deepspeed=rt.deepspeed)
    if compile_enabled(cfg.run.compile, rt.device):
        compile_blocks(model)  # regional: each transformer block, a short cold start
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(rt.device)
    return model, optimizer, teacher, fingerprint, frozen


def train(cfg: PretrainConfig) -> dict:
    """Pretrain; returns a small summary dict (final step, last logged loss, paths)."""
    rt = start_run(cfg.run, cfg.optim, micro=cfg.data.micro_batch, global_=cfg.data.global_batch)
    cfg = with_dataset_defaults(cfg, rt.is_main)  # objective defaults, in_chans, mean/std: the run records them
    model, optimizer, teacher, fingerprint, frozen = build(cfg, rt)
    raw = rt.accelerator.unwrap_model(model)
    info = resolve(cfg.data.train)
    peak_lr = cfg.optim.peak_lr(rt.global_batch)
    flops = pretrain_flops_per_image(raw, cfg.data2vec.top_k if cfg.model.objective == "data2vec" else None)
    record = {"peak_lr": peak_lr, "flops_per_image": flops["train"], "data": cfg.data.train}
    with Session(rt, cfg, name="pretrain", fingerprint=fingerprint, record=record) as session:
        if teacher is not None:
            session.register("teacher", teacher)
        corrupt = CorruptCount(rt.accelerator)
        session.register("corrupt", corrupt)
        loader = build_loader(cfg, rt, info, raw)
        session.register_loader(loader)
        start = session.begin()
        rt.say(summary(cfg, rt, raw, info, peak_lr, flops, start))
        with torch.random.fork_rng(devices=[]):  # reading the grid's images must not move the training RNG
            pictures = rt.is_main and not rt.sharded and predicts_pixels(raw)  # one rank cannot run a sharded model
            vis_images = fixed_images(cfg, rt.device) if pictures else None

        def step_fn(batch: dict) -> torch.Tensor:
            corrupt.update(batch)
            noise = batch.get("noise")  # [B, L], the samples' own masks (none from the synthetic loader)
            if teacher is None:
                return model(batch["image"], noise=noise)[0]
            # data2vec: the teacher's targets from the whole image
            return model(batch["image"], teacher.targets(batch["image"]), noise=noise)[0]

        def log_extra(step: int) -> dict:  # log steps only: an all-reduce and a host read
            out = {"n_corrupt": corrupt.total(), "batches": step * rt.accum}
            if info.num_samples:
                out["epoch"] = step * rt.global_batch / info.num_samples
            if teacher is not None:
                out["teacher_decay"] = teacher.decay_at(step)
            return out

        def picture(step: int) -> None:
            if vis_images is not None and step < cfg.run.steps:  # the final grid comes from the exported weights
                grid(raw, vis_images.to(rt.dtype), session.run_dir / run_files.RECONSTRUCTION_STEPS
                     / f"step_{step:06d}.png", cfg)

        batches = device_batches(loader, rt.device, mean=cfg.data.mean, std=cfg.data.std, dtype=rt.dtype,
                                 pin_memory=cfg.data.pin_memory, prefetch=cfg.data.prefetch)
        knn, monitor = knn_hook(cfg, rt, raw)
        baselines = knn_baselines(monitor, session, raw)
        result = TrainLoop(session, model, optimizer, step_fn, batches, peak_lr,
                           hooks=[Hook(cfg.run.eval_every, picture), *knn], log_extra=log_extra,
                           desc="pretrain", flops_per_image=flops["train"], show=baselines,
                           after_update=(lambda step: teacher.update(raw.encoder, step)) if teacher else None).fit()
        if result.stopped_by:
            return session.stopped(result)
        knn_end(monitor, session, baselines)
        return export(cfg, rt, session, model, raw, result, frozen, teacher, vis_images)


def export(cfg: PretrainConfig, rt: Runtime, session: Session, model, raw, result, frozen, teacher,
           vis_images) -> dict:
    """The run's weights (full model, encoder under timm names, data2vec's teacher) and the final reconstruction
    grid, from the fp32 weights of the last checkpoint; the run record's end. A stop signal meanwhile waits for the
    export (seconds); every file is written atomically, and a re-run after a kill writes them again."""
    with signals_deferred(rt.say):
        return _export(cfg, rt, session, model, raw, result, frozen, teacher, vis_images)


def _export(cfg, rt: Runtime, session: Session, model, raw, result, frozen, teacher, vis_images) -> dict:
    final = export_state_dict(rt.accelerator, model, result.checkpoint, frozen=frozen)
    run_dir = session.run_dir
    out = {"step": result.step, "loss": result.loss, "run_dir": str(run_dir), "stopped_by": None}
    if rt.is_main:
        weights = run_dir / run_files.PRETRAINER[cfg.model.objective]
        save_weights(final, weights)
        enc_cfg = raw.encoder_cfg  # in the metadata: the head count is not visible in the shapes
        save_encoder(to_encoder_state_dict(final), run_dir / run_files.ENCODER, encoder_cfg=enc_cfg)
        if teacher is not None:
            save_encoder(teacher.encoder.state_dict(), run_dir / run_files.TEACHER_ENCODER, encoder_cfg=enc_cfg)
        fresh = build_model(cfg)
        if predicts_pixels(fresh):
            images = vis_images if vis_images is not None else fixed_images(cfg, rt.device)
            if images is not None:
                fresh.load_state_dict(final)
                grid(fresh.to(images.device), images, run_dir / run_files.RECONSTRUCTIONS, cfg)
        else:
            print(f"note: no reconstruction grid: model.objective={cfg.model.objective} "
                  f"predicts {cfg.model.target or 'teacher features'}, not pixels", flush=True)
        loss = "nan" if result.loss is None else f"{result.loss:.4f}"
        print(f"done: step {result.step}, loss {loss}; weights in {run_dir / run_files.ENCODER} and {weights}",
              flush=True)
        out.update(encoder=str(run_dir / run_files.ENCODER), weights=str(weights),
                   **{cfg.model.objective: str(weights)})
    rt.accelerator.wait_for_everyone()
    session.finish(result.step, {"loss": result.loss})
    return out


def main(argv: list[str] | None = None) -> dict:
    return train(parse_cli(PretrainConfig, argv, PROG))


if __name__ == "__main__":
    cli(PROG, main)()
