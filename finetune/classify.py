"""Supervised fine-tuning of an encoder: `accelerate launch finetune/classify.py [CONFIG.yaml] [key=value ...]`.

The encoder (our encoder.safetensors, an official MAE .pth, timm:NAME + weights, or `random` for from-scratch) goes
into a timm VisionTransformer with a class head (`model.global_pool=avg`: mean of patch tokens + fc_norm, as MAE
fine-tuning), position embeddings interpolated when `data.img_size` differs. The MAE recipe: AdamW with layer-wise
lr decay, warmup + cosine, drop path, timm Mixup/CutMix + SoftTargetCrossEntropy (label-smoothing CE when mixup is
off), RandAugment and random erasing (`data.transforms.finetune_transform`), optional weight EMA (timm ModelEmaV3).
config -> model -> loader -> step function -> the shared loop (`launch/loop.py`) -> export. Evaluation every
`eval_every` steps and at the end over exactly the test split's images; writes eval.json,
`classifier_{best,last}.safetensors` + classifier.json, metrics.jsonl and resumable checkpoints.

`arch=` may also name a hybrid ViT (a convolutional stem as the patch embedding, `models/hybrid.py`) or, for training
from scratch (`encoder=random`), a timm CNN such as `timm:resnet18`. `distill.kind=hard|soft` trains a DeiT student
(`finetune/distill.py`): a distillation token and head beside CLS learn from a frozen teacher (`distill.teacher=`: a
classifier run, or timm:NAME + `distill.teacher_weights=`) that sees the same mixed images; the teacher's test
accuracy is printed before training; it is never checkpointed or exported with the student.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import DistributedType, set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from data.device_erasing import DeviceRandomErasing, erasing_generator
from data.device_input import device_batches
from data.eval_stream import build_eval_loader
from data.seeding import mix_seed
from data.train_stream import build_train_loader
from data.transforms import default_crop_pct, eval_transform, finetune_transform, uint8_output
from finetune.classifier_io import save_classifier
from finetune.config import FinetuneConfig
from finetune.distill import distillation_loss, load_teacher
from finetune.encoder_source import resolve_encoder
from finetune.evaluation import evaluate_model, write_eval_json
from finetune.splits import check_same_classes, labelled_split, norm_stats, split_spec
from launch.accel import build_accelerator, configure_deepspeed, input_dtype
from launch.checkpoint import model_fingerprint
from launch.config import ConfigError, parse_cli
from launch.errors import cli
from launch.loop import Hook, TrainLoop
from launch.param_groups import build_adamw, param_groups
from launch.sections import resolve_batch
from launch.session import open_session
from models.classifier import create_classifier, init_heads, load_encoder_into, timm_args
from models.compile import compile_blocks, compile_enabled

PROG = "finetune/classify.py"


def build_classifier(source, cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict, dict | None]:
    """(timm classifier with the encoder's weights loaded, its encoder_cfg, the load report). With distillation on,
    a VisionTransformerDistilled in distilled-training mode (its forward returns the two heads' logits)."""
    enc_cfg = dict(source.encoder_cfg)
    if cfg.data.img_size:
        enc_cfg["img_size"] = cfg.data.img_size
    try:
        model = create_classifier(enc_cfg, num_classes, global_pool=cfg.model.global_pool,
                                  drop_path_rate=cfg.model.drop_path_rate, img_size=enc_cfg["img_size"],
                                  distilled=cfg.distill.active)
    except ValueError as exc:  # an architecture/option combination the models refuse, e.g. a distilled CNN
        raise ConfigError(str(exc)) from None
    report = load_encoder_into(model, source.state_dict) if source.state_dict is not None else None
    with torch.no_grad():
        init_heads(model, cfg.model.head_init_std)
    if cfg.distill.active:
        model.set_distilled_training(True)
    return model, enc_cfg, report


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(mixup_fn or None, training loss): SoftTargetCrossEntropy with mixup/cutmix, else label-smoothing CE."""
    aug = cfg.aug
    if aug.mixup_active:
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode, label_smoothing=aug.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return None, nn.CrossEntropyLoss()


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(FinetuneConfig, argv, PROG)

    # checks before anything is built or trained: labelled splits with one class count, an encoder that loads
    train_info = labelled_split(cfg.data.path, cfg.data.train_split, cfg.num_classes)
    test_info = labelled_split(cfg.data.path, cfg.data.test_split, cfg.num_classes)
    num_classes = check_same_classes(train_info, test_info)
    source = resolve_encoder(cfg.encoder, weights=cfg.encoder_weights, arch=cfg.arch, num_heads=cfg.num_heads,
                             seed=cfg.run.seed)
    mean, std = norm_stats(cfg.data.mean, cfg.data.std, train_info)
    teacher, teacher_info = None, None
    if cfg.distill.active:  # frozen and in eval mode; never prepared, registered, or attached to the student
        d = cfg.distill
        teacher, teacher_info = load_teacher(d.teacher, weights=d.teacher_weights, num_classes=num_classes,
                                             class_names=train_info.class_names, student_mean=mean, student_std=std,
                                             mean=d.teacher_mean, std=d.teacher_std)
        teacher_info.update(kind=d.kind, tau=d.tau, alpha=d.alpha)

    accelerator = build_accelerator(cfg.run, cfg.optim)
    world, rank, device, accum = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                  cfg.optim.grad_accum_steps)
    micro, global_batch = resolve_batch(cfg.data.micro_batch, cfg.data.global_batch, world, accum)
    configure_deepspeed(accelerator, micro, cfg.optim)
    if cfg.aug.mixup_active and micro % 2:
        raise ConfigError(f"mixup/cutmix need an even micro-batch; the batch config gives {micro} per process "
                          f"(set aug.mixup=0 aug.cutmix=0 or change data.global_batch / data.micro_batch)")
    set_seed(cfg.run.seed)
    model, enc_cfg, report = build_classifier(source, cfg, num_classes)
    img_size = enc_cfg["img_size"] if isinstance(enc_cfg["img_size"], int) else enc_cfg["img_size"][0]
    crop_pct = cfg.data.crop_pct if cfg.data.crop_pct is not None else default_crop_pct(img_size)
    if accelerator.is_main_process:
        for note in source.notes:
            print(f"[finetune] note: {note}")
        if report is not None:
            print(f"[finetune] encoder from {cfg.encoder}: {report}")
    fingerprint = model_fingerprint(model)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    optimizer = build_adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim,
                            deepspeed=deepspeed)
    if compile_enabled(cfg.run.compile, device) and "cnn" not in enc_cfg:
        compile_blocks(model)  # regional: each transformer block (a CNN has none)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) \
        if cfg.ema.enabled else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    mixup_fn, criterion = build_criterion(cfg, num_classes)
    if teacher is not None:  # DeepSpeed runs the student in bf16/fp16 without autocast: the teacher follows
        teacher.to(device, input_dtype(accelerator) if deepspeed else None)
    session = open_session(accelerator, cfg, fingerprint=fingerprint, name="finetune")
    run_dir, best = session.run_dir, {"top1": float(session.state.get("best_top1", -1.0))}

    dtype = input_dtype(accelerator)
    # 8-bit RGB travels as uint8 and is normalised on the device, where random erasing then runs (timm's
    # PrefetchLoader order), seeded by the micro-step so a resumed run erases the same boxes
    output = uint8_output(train_info.meta, enc_cfg.get("in_chans", 3))
    erase = DeviceRandomErasing(cfg.aug.reprob) if output == "uint8" and cfg.aug.reprob > 0 else None
    micro_index = [session.start_step * accum]
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    train_tf = finetune_transform(img_size, mean, std, auto_augment=cfg.aug.auto_augment, reprob=cfg.aug.reprob,
                                  output=output)
    loader = build_train_loader(split_spec(cfg.data.path, cfg.data.train_split), batch_size=micro, transform=train_tf,
                                seed=cfg.run.seed, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=pin)
    if session.resumed:
        loader.load_state_dict({**session.state.get("loader", {}), "batches": session.start_step * accum})
    etf = eval_transform(img_size, mean, std, crop_pct, output=output)

    def test_loader():
        return build_eval_loader(split_spec(cfg.data.path, cfg.data.test_split), batch_size=cfg.data.eval_batch_size,
                                 transform=etf, rank=rank, world_size=world, num_workers=cfg.data.num_workers)

    def run_eval(desc: str = "eval") -> dict:
        loader_ = test_loader()
        result = {}
        for name, net in (("model", model), ("ema", ema.module if ema is not None else None)):
            if net is not None:
                batches = device_batches(loader_, device, mean=mean, std=std, dtype=dtype)
                result[name] = evaluate_model(net, batches, accelerator, total=len(loader_), progress=cfg.run.progress,
                                              desc=desc + (" (ema)" if name == "ema" else ""))
        out = dict(result["model"])
        if "ema" in result:
            out["ema"] = {k: result["ema"][k] for k in ("top1", "top5", "n_images")}
        return out

    if teacher is not None:  # the teacher's own accuracy, on the images it will see, before training starts
        loader_ = test_loader()
        t_eval = evaluate_model(teacher, device_batches(loader_, device, mean=mean, std=std, dtype=dtype),
                                accelerator, total=len(loader_), progress=cfg.run.progress, desc="teacher")
        teacher_info.update(top1=t_eval["top1"], top5=t_eval["top5"], n_images=t_eval["n_images"])
        if accelerator.is_main_process:
            print(f"[finetune] teacher {cfg.distill.teacher} ({teacher_info['arch']}): top1 {t_eval['top1']:.2f}  "
                  f"top5 {t_eval['top5']:.2f}  on {t_eval['n_images']} test images; {cfg.distill.kind} "
                  f"distillation, tau {cfg.distill.tau}, alpha {cfg.distill.alpha}", flush=True)

    kind = "distilled" if cfg.distill.active else "cnn" if "cnn" in enc_cfg else "vit"
    timm_name, timm_kwargs = timm_args(enc_cfg, num_classes, cfg.model.global_pool, distilled=cfg.distill.active)
    meta = {"kind": kind, "encoder_cfg": enc_cfg, "num_classes": num_classes, "global_pool": cfg.model.global_pool,
            "img_size": img_size, "mean": list(mean), "std": list(std), "crop_pct": crop_pct,
            "class_names": train_info.class_names, "encoder": source.describe(),
            "timm": {"name": timm_name, "kwargs": timm_kwargs}}
    if teacher_info is not None:
        meta["distill"] = teacher_info

    def save_weights(name: str, step: int) -> None:
        state = accelerator.get_state_dict(model)  # all ranks (ZeRO-3 gathers)
        if accelerator.is_main_process:
            save_classifier(state, run_dir / name, {**meta, "step": step})
            if ema is not None:
                save_classifier(ema.module.state_dict(), run_dir / name.replace("classifier_", "classifier_ema_"),
                                {**meta, "step": step})

    def evaluate_hook(step: int) -> dict | None:
        if step >= cfg.run.steps:  # the final evaluation follows the loop
            return None
        r = run_eval()
        if r["top1"] > best["top1"]:
            best["top1"] = r["top1"]
            save_weights("classifier_best.safetensors", step)
        return {"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]}

    parts = torch.zeros(3, device=device)  # distillation: [sum of CLS-head losses, of distillation losses, count]

    def step_fn(batch: dict) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if erase is not None:
            images = erase(images, erasing_generator(device, mix_seed(cfg.run.seed, "erase", rank, micro_index[0])))
            micro_index[0] += 1
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if teacher is None:
            return criterion(model(images).float(), targets)
        cls_logits, dist_logits = model(images)
        loss, base, dist = distillation_loss(cls_logits.float(), dist_logits.float(), targets,
                                             teacher(images).float(), kind=cfg.distill.kind, tau=cfg.distill.tau,
                                             alpha=cfg.distill.alpha, base_criterion=criterion)
        both = torch.stack([base.detach(), dist.detach()])
        parts.add_(torch.where(torch.isfinite(both).all(), torch.cat([both, both.new_ones(1)]), 0.0))  # no sync
        return loss

    def log_parts(step: int) -> dict:  # at log steps only (the loop's log_extra): the host may read the device
        total = accelerator.reduce(parts, reduction="sum") if world > 1 else parts
        base_sum, dist_sum, n = total.tolist()
        parts.zero_()
        return {"loss_cls": base_sum / n, "loss_distill": dist_sum / n} if n else {}

    def save(step: int, loop_state: dict):
        return session.ckpt.save(step, {**loop_state, "best_top1": best["top1"], "config": session.config,
                                        "fingerprint": fingerprint,
                                        "loader": {**loader.state_dict(), "batches": step * accum}})

    loop = TrainLoop(
        accelerator=accelerator, model=model, optimizer=optimizer, step_fn=step_fn,
        batches=device_batches(loader, device, mean=mean, std=std, dtype=dtype, pin_memory=pin,
                               prefetch=cfg.data.prefetch),
        run=cfg.run, optim=cfg.optim, peak_lr=cfg.optim.peak_lr(global_batch), global_batch=global_batch,
        metrics=session.metrics, save=save, hooks=[Hook(cfg.eval_every, evaluate_hook)],
        log_extra=log_parts if teacher is not None else None,
        after_update=(lambda step: ema.update(accelerator.unwrap_model(model), step=step)) if ema else None,
        desc="finetune")
    done = loop.fit(session.start_step, session.state)
    if done.stopped_by:
        return session.stopped("finetune", done, accelerator.is_main_process)

    result = run_eval()
    session.metrics.log(done.step, {"test_top1": result["top1"], "test_top5": result["top5"],
                                    "test_loss": result["loss"]})
    save_weights("classifier_last.safetensors", done.step)
    if result["top1"] > best["top1"] or not (run_dir / "classifier_best.safetensors").exists():
        best["top1"] = max(best["top1"], result["top1"])
        save_weights("classifier_best.safetensors", done.step)
    summary = {"top1": result["top1"], "top5": result["top5"], "n_images": result["n_images"],
               "n_corrupt": result["n_corrupt"], "loss": result["loss"],
               "best_top1": best["top1"], "task": "finetune", "global_pool": cfg.model.global_pool,
               "steps": done.step, "global_batch": global_batch, "peak_lr": cfg.optim.peak_lr(global_batch),
               "encoder": source.describe(), "data": f"{cfg.data.path}:{cfg.data.test_split}",
               "num_classes": num_classes, "world_size": world}
    if "ema" in result:
        summary["ema"] = result["ema"]
    summary["arch"] = enc_cfg.get("cnn") or enc_cfg.get("hybrid") or cfg.arch
    if teacher_info is not None:
        summary["distill"] = teacher_info
    write_eval_json(run_dir / "eval.json", summary, accelerator)
    if accelerator.is_main_process:
        print(f"[finetune] {done.step} steps: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  on "
              f"{result['n_images']} images (best {best['top1']:.2f}) -> {Path(run_dir) / 'eval.json'}")
    accelerator.wait_for_everyone()
    session.close()
    return summary


if __name__ == "__main__":
    cli(PROG, main)()
