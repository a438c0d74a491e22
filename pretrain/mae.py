"""MAE pretraining on WebDataset shards with Accelerate (one process, DDP or DeepSpeed ZeRO).

    python pretrain/mae.py                                   # small MAE on the shipped sample, a few CPU minutes
    accelerate launch pretrain/mae.py pretrain/configs/cifar10.yaml data.train=/data/cifar10-wds
    accelerate launch --config_file launch/accelerate/zero2.yaml pretrain/mae.py pretrain/configs/in1k_vit_base.yaml

config -> model -> loader -> step function -> the shared loop (`launch/loop.py`) -> export. Re-running the same
command resumes from the newest complete checkpoint in `run.output_dir` (model, optimizer, GradScaler, RNG states and
the data-stream position). SIGTERM/SIGUSR1 save a checkpoint at the next step boundary and exit 0. Writes
RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/, reconstructions/, reconstructions.png,
encoder.safetensors (timm key names), mae.safetensors (full MAE, our key names)}.

`model.objective` picks what is learned (models/objectives.py): `mae` (default), `simmim` or `data2vec`;
`model.target` pixels or hog for mae and simmim. Every objective exports encoder.safetensors (a timm ViT); the full
model goes to `<objective>.safetensors` (mae.safetensors, simmim.safetensors, data2vec.safetensors: the student;
the data2vec EMA teacher's encoder also to teacher_encoder.safetensors). Reconstruction grids need pixel predictions
(mae or simmim with pixel targets); other runs skip them and say so.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import save_file

from data.device_dataset import build_device_loader
from data.device_input import device_batches
from data.first_images import first_images
from data.info import DatasetError, resolve
from data.train_stream import build_train_loader
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform, uint8_output
from launch.accel import build_accelerator, configure_deepspeed, input_dtype, zero_stage
from launch.checkpoint import ResumeMismatch, export_state_dict, frozen_parameters, model_fingerprint
from launch.config import ConfigError, parse_cli
from launch.errors import cli
from launch.knn_monitor import build_knn_monitor
from launch.loop import Hook, NonFiniteLossError, TrainLoop
from launch.param_groups import build_adamw, param_groups
from launch.sections import resolve_batch
from launch.session import open_session
from launch.warm_start import set_layer_norm_eps, warm_start
from models.compile import compile_blocks, compile_enabled
from models.convert import save_encoder, to_encoder_state_dict
from models.data2vec import EmaTeacher
from models.objectives import create_pretrainer, predicts_pixels, pretrain_flops_per_image, weights_name
from pictures.recon_grid import save_reconstruction_grid
from pretrain.config import PretrainConfig

PROG = "pretrain/mae.py"
REPO = Path(__file__).resolve().parents[1]


def local_spec(spec: str) -> str:
    """Relative dataset folders are tried from the current directory, then from the repository root."""
    head = spec.split(":")[0]
    if spec and not Path(head).exists() and (REPO / head).exists():
        return str(REPO / spec)
    return spec


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
    """The config with `model.in_chans` and `data.mean`/`data.std` filled in where None: from the training split's
    dataset.json (`channels`, `mean`, `std`, written by data/make_shards.py), else 3 channels and ImageNet's
    statistics (0.5 for other channel counts, said in a note). `build_model` gives the model `model.in_chans`."""
    try:
        meta = resolve(local_spec(cfg.data.train)).meta or {}
    except DatasetError as exc:
        raise ConfigError(f"data.train: {exc}") from None
    m, d = cfg.model, cfg.data
    chans = int(m.in_chans or m.overrides.get("in_chans") or meta.get("channels") or 3)
    stats = meta if meta.get("channels") == chans and meta.get("mean") and meta.get("std") else {}
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if chans == 3 else ((0.5,) * chans, (0.5,) * chans)
    mean = tuple(d.mean or stats.get("mean") or default_mean)
    std = tuple(d.std or stats.get("std") or default_std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != chans:
            raise ConfigError(f"{key} has {len(values)} values but the images have {chans} channels (model.in_chans)")
    if say and chans != 3 and not (d.mean or stats):
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


def build_loader(cfg: PretrainConfig, micro: int, accelerator, info):
    """The training loader: shards through worker processes (`data.loader=stream`), or the whole split on the
    device as uint8 (`data.loader=device`, CIFAR-scale data; crop and flip on the device)."""
    d, rank, world = cfg.data, accelerator.process_index, accelerator.num_processes
    if d.loader == "device":
        if d.augment == "none" or cfg.model.in_chans != 3:
            raise ConfigError("data.loader=device crops 8-bit RGB images on the device: it needs data.augment=crop "
                              "and 3 channels")
        return build_device_loader(local_spec(d.train), batch_size=micro, img_size=cfg.model.img_size,
                                   device=accelerator.device, seed=cfg.run.seed, rank=rank, world_size=world,
                                   scale=tuple(d.crop_scale), hflip=d.hflip)
    pin = d.pin_memory if d.pin_memory is not None else accelerator.device.type == "cuda"
    kwargs = {} if d.shuffle_buffer is None else {"shuffle_buffer": d.shuffle_buffer}
    return build_train_loader(local_spec(d.train), batch_size=micro,
                              transform=train_transform(cfg, uint8_output(info.meta, cfg.model.in_chans)),
                              seed=cfg.run.seed, rank=rank, world_size=world, num_workers=d.num_workers,
                              pin_memory=pin, **kwargs)


def recon_spec(cfg: PretrainConfig) -> str:
    """The grid's images: `data.recon`, else a val/test split next to the train split, else train."""
    if cfg.data.recon:
        return local_spec(cfg.data.recon)
    train = local_spec(cfg.data.train)
    folder = train.rsplit(":", 1)[0] if ":" in train and Path(train.rsplit(":", 1)[0]).is_dir() else train
    if Path(folder).is_dir():
        for split in ("val", "test"):
            try:
                resolve(f"{folder}:{split}")
                return f"{folder}:{split}"
            except Exception:  # no such split: try the next
                continue
    return train


def fixed_images(cfg: PretrainConfig, device) -> torch.Tensor | None:
    """The first `vis.num_images` images of the recon split, normalised, deterministic (eval transform)."""
    n = cfg.vis.num_images
    if n == 0:
        return None
    tf = eval_transform(cfg.model.img_size, cfg.data.mean, cfg.data.std, crop_pct=1.0)
    images = first_images(recon_spec(cfg), n, tf)  # reads only the shard(s) holding them (remote data too)
    return None if images is None else images.to(device)


def grid(model, images, path: Path, cfg: PretrainConfig) -> None:
    """Write a reconstruction grid without touching the training RNG streams."""
    was_training = model.training
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), torch.no_grad():
        save_reconstruction_grid(model, images, path, cfg.data.mean, cfg.data.std, cfg.model.mask_ratio, cfg.vis.seed)
    model.train(was_training)


def summary(cfg, accelerator, model, info, micro, global_batch, peak_lr, start_step) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    flops = pretrain_flops_per_image(model, cfg.data2vec.top_k if cfg.model.objective == "data2vec" else None)
    stage = zero_stage(accelerator)
    images = cfg.run.steps * global_batch
    epochs = f" = {images / info.num_samples:.2f} epochs" if info.num_samples else ""
    return "\n".join([
        f"model       {cfg.model.name}: {n_params / 1e6:.2f}M parameters ({n_enc / 1e6:.2f}M encoder), "
        f"img {cfg.model.img_size}px, patch {model.patch_size}, mask {cfg.model.mask_ratio} ({cfg.model.mask_type}), "
        f"norm_pix_loss {cfg.model.norm_pix_loss}, objective {cfg.model.objective}"
        + (f", target {cfg.model.target}" if cfg.model.target else ""),
        f"FLOPs/image forward {flops['forward'] / 1e9:.3f} G, train {flops['train'] / 1e9:.3f} G",
        f"data        {cfg.data.train}: {info.num_samples if info.num_samples is not None else 'unknown'} images, "
        f"{len(info.urls)} shards",
        f"batch       micro {micro}/process x {accelerator.num_processes} processes x "
        f"{cfg.optim.grad_accum_steps} accumulation = global {global_batch}",
        f"schedule    {cfg.run.steps} steps ({images} images{epochs}), peak lr {peak_lr:.3g} "
        f"(blr {cfg.optim.blr:g} x {global_batch}/256{' overridden' if cfg.optim.lr is not None else ''}), "
        f"warmup {cfg.optim.warmup_steps}, min_lr {cfg.optim.min_lr:g}, wd {cfg.optim.weight_decay}",
        f"runtime     {accelerator.distributed_type.value}, world size {accelerator.num_processes}, device "
        f"{accelerator.device}, precision {accelerator.mixed_precision}, DeepSpeed ZeRO stage "
        f"{stage if stage is not None else '-'}",
        f"run dir     {cfg.run.output_dir}" + (f" (resuming at step {start_step})" if start_step else ""),
    ])


def knn_hook(cfg: PretrainConfig, accelerator, raw_model) -> list[Hook]:
    """The k-NN monitor as a loop hook (every `knn.every` steps and at the end, in the step's metrics record), or
    none: `knn.enabled=false`, or no labelled bank/query split (said in one line)."""
    if not cfg.knn.enabled:
        return []
    k = cfg.knn
    monitor, note = build_knn_monitor(
        bank=local_spec(k.bank) if k.bank else None, query=local_spec(k.query) if k.query else None,
        train=local_spec(cfg.data.train), accelerator=accelerator, encoder=lambda: raw_model.encoder,
        img_size=cfg.model.img_size, mean=cfg.data.mean, std=cfg.data.std, bank_size=k.bank_size,
        query_size=k.query_size, batch_size=k.batch_size, num_workers=cfg.data.num_workers,
        dtype=input_dtype(accelerator), k=k.k, temperature=k.temperature, pool=k.pool)
    if accelerator.is_main_process:
        print(note, flush=True)
    return [Hook(k.every, monitor, at_end=True, merge=True)] if monitor is not None else []


def train(cfg: PretrainConfig) -> dict:
    """Pretrain; returns a small summary dict (final step, last logged loss, paths)."""
    cfg = replace(cfg, model=cfg.model.resolved())  # the objective's defaults, as config.yaml records them
    accelerator = build_accelerator(cfg.run, cfg.optim)
    cfg = with_dataset_defaults(cfg, accelerator.is_main_process)  # in_chans, mean/std: the run records them
    device, is_main, accum = accelerator.device, accelerator.is_main_process, cfg.optim.grad_accum_steps
    micro, global_batch = resolve_batch(cfg.data.micro_batch, cfg.data.global_batch, accelerator.num_processes, accum)
    configure_deepspeed(accelerator, micro, cfg.optim)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    set_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if cfg.model.layer_norm_eps is not None:
        set_layer_norm_eps(model, cfg.model.layer_norm_eps)
    if cfg.model.init_from:  # continued pretraining: starting weights, fresh optimizer and schedule
        note = warm_start(model, local_spec(cfg.model.init_from), cfg.model.layer_norm_eps)
        if accelerator.is_main_process:
            print(note, flush=True)
    teacher = build_teacher(cfg, model)  # data2vec: the EMA teacher, built before compile and prepare
    if teacher is not None and zero_stage(accelerator) == 3:
        raise ConfigError("model.objective=data2vec needs whole parameters on every rank for its EMA teacher; "
                          "use DDP or ZeRO-2 (launch/accelerate/zero2.yaml), not ZeRO-3")
    fingerprint = model_fingerprint(model)
    frozen = frozen_parameters(model)  # fp32 sin-cos tables (DeepSpeed bf16 keeps no fp32 copy of frozen tensors)
    info = resolve(local_spec(cfg.data.train))
    peak_lr = cfg.optim.peak_lr(global_batch)
    optimizer = build_adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim,
                            deepspeed=deepspeed)
    if compile_enabled(cfg.run.compile, device):
        compile_blocks(model)  # regional: each transformer block, a short cold start
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if teacher is not None:  # in every checkpoint, so a resume continues the same teacher
        teacher.to(device)
        accelerator.register_for_checkpointing(teacher)

    session = open_session(accelerator, cfg, fingerprint=fingerprint, name="pretrain")
    state = session.state
    if not session.resumed:  # per-rank masking noise; on resume the RNG states come from the checkpoint
        set_seed(cfg.run.seed + accelerator.process_index)
    if is_main:
        print(summary(cfg, accelerator, raw_model, info, micro, global_batch, peak_lr, session.start_step), flush=True)

    loader = build_loader(cfg, micro, accelerator, info)
    if session.resumed:
        loader.load_state_dict({**state.get("loader", {}), "batches": session.start_step * accum})
    with torch.random.fork_rng(devices=[]):  # reading the grid's images must not move the training RNG
        pictures = is_main and zero_stage(accelerator) != 3 and predicts_pixels(raw_model)
        vis_images = fixed_images(cfg, device) if pictures else None

    knn = knn_hook(cfg, accelerator, raw_model)
    corrupt = {"base": int(state.get("n_corrupt", 0)), "rank": 0}  # the loader's running count on this rank

    def step_fn(batch: dict) -> torch.Tensor:
        corrupt["rank"] = batch.get("n_corrupt", 0)
        if teacher is None:
            loss, _, _ = model(batch["image"])
        else:  # data2vec: the teacher's targets from the whole image, no gradient
            loss, _, _ = model(batch["image"], teacher.targets(batch["image"]))
        return loss

    def n_corrupt() -> int:  # log and save steps only: an all-reduce and a host read
        here = torch.tensor(float(corrupt["rank"]), device=device)
        return corrupt["base"] + int(accelerator.reduce(here, reduction="sum").item())

    def log_extra(step: int) -> dict:
        out = {"n_corrupt": n_corrupt(), "batches": step * accum}
        if info.num_samples:
            out["epoch"] = step * global_batch / info.num_samples
        if teacher is not None:
            out["teacher_decay"] = teacher.decay_at(step)
        return out

    def save(step: int, loop_state: dict):
        return session.ckpt.save(step, {**loop_state, "n_corrupt": n_corrupt(), "config": session.config,
                                        "fingerprint": fingerprint,
                                        "loader": {**loader.state_dict(), "batches": step * accum}})

    def picture(step: int) -> None:
        if vis_images is not None:
            grid(raw_model, vis_images.to(input_dtype(accelerator)),
                 session.run_dir / "reconstructions" / f"step_{step:06d}.png", cfg)

    loop = TrainLoop(
        accelerator=accelerator, model=model, optimizer=optimizer, step_fn=step_fn,
        batches=device_batches(loader, device, mean=cfg.data.mean, std=cfg.data.std, dtype=input_dtype(accelerator),
                               pin_memory=cfg.data.pin_memory, prefetch=cfg.data.prefetch),
        run=cfg.run, optim=cfg.optim, peak_lr=peak_lr, global_batch=global_batch, metrics=session.metrics,
        save=save, hooks=[Hook(cfg.vis.every, picture), *knn], log_extra=log_extra, desc="pretrain",
        after_update=(lambda step: teacher.update(raw_model.encoder, step)) if teacher is not None else None)
    result = loop.fit(session.start_step, state)
    out = {"step": result.step, "loss": result.loss, "run_dir": str(session.run_dir), "stopped_by": result.stopped_by}
    if result.stopped_by:
        if is_main:
            print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved in {result.checkpoint}. "
                  f"Re-run the same command to resume.", flush=True)
        session.close()
        return out

    final = export_state_dict(accelerator, model, result.checkpoint, frozen=frozen)
    if is_main:
        run_dir = session.run_dir
        weights = run_dir / weights_name(cfg.model.objective)  # mae/simmim/data2vec.safetensors
        save_file(final, str(weights))
        enc_cfg = raw_model.encoder_cfg  # in the metadata: the head count is not visible in the shapes
        save_encoder(to_encoder_state_dict(final), run_dir / "encoder.safetensors", encoder_cfg=enc_cfg)
        if teacher is not None:
            save_encoder(teacher.encoder.state_dict(), run_dir / "teacher_encoder.safetensors", encoder_cfg=enc_cfg)
        fresh = build_model(cfg)
        if predicts_pixels(fresh):
            images = vis_images if vis_images is not None else fixed_images(cfg, device)
            if images is not None:
                fresh.load_state_dict(final)
                grid(fresh.to(images.device), images, run_dir / "reconstructions.png", cfg)
        else:
            print(f"note: no reconstruction grid: model.objective={cfg.model.objective} "
                  f"predicts {cfg.model.target or 'teacher features'}, not pixels", flush=True)
        loss = "nan" if result.loss is None else f"{result.loss:.4f}"
        print(f"done: step {result.step}, loss {loss}; weights in {run_dir / 'encoder.safetensors'} "
              f"and {weights}", flush=True)
        out.update(encoder=str(run_dir / "encoder.safetensors"), weights=str(weights),
                   **{cfg.model.objective: str(weights)})
    accelerator.wait_for_everyone()
    session.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(PretrainConfig, argv, PROG)
    try:
        return train(cfg)
    except (NonFiniteLossError, ResumeMismatch) as exc:
        raise SystemExit(f"{PROG}: {exc}") from None


if __name__ == "__main__":
    cli(PROG, main)()
