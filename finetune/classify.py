"""End-to-end fine-tuning of a pretrained encoder: `accelerate launch finetune/classify.py [CONFIG.yaml] [key=value ...]`.

The encoder (our encoder.safetensors, an official MAE .pth, timm:NAME + weights, or `random` for from-scratch) goes
into a timm VisionTransformer with a class head (`model.global_pool=avg`: mean of patch tokens + fc_norm, as MAE
fine-tuning), position embeddings interpolated when `data.img_size` differs. Training follows the MAE recipe:
AdamW with layer-wise lr decay (`launch.param_groups`), warmup + cosine set by hand each step (`launch.schedule`),
drop path, timm Mixup/CutMix + SoftTargetCrossEntropy (label-smoothing CE when mixup is off), RandAugment and random
erasing through `data.transforms.finetune_transform`, optional weight EMA (timm ModelEmaV3).
Evaluation at `eval_every` steps and at the end over exactly the test split's images; writes eval.json,
`classifier_{best,last}.safetensors` + classifier.json, metrics.jsonl and resumable checkpoints (step, data position).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not from finetune/
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    sys.modules.pop("finetune", None)  # this file itself may have been registered under the package's name

import time

import torch
import torch.nn as nn
from tqdm import tqdm

from finetune.classifier_io import save_classifier
from finetune.config import FinetuneConfig
from finetune.encoder_source import resolve_encoder
from finetune.eval_loop import evaluate_model, write_eval_json
from finetune.resume import open_run
from finetune.linprobe import micro_batch_size, world_size_from_env
from finetune.splits import check_same_classes, labelled_split, norm_stats, split_spec
from launch.config import ConfigError, parse_cli, save_config, to_dict


def build_classifier(source, cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict, dict | None]:
    """(timm classifier with the encoder's weights loaded, its encoder_cfg, the load report)."""
    from timm.layers import trunc_normal_

    from models.classifier import create_classifier, load_encoder_into

    enc_cfg = dict(source.encoder_cfg)
    if cfg.data.img_size:
        enc_cfg["img_size"] = cfg.data.img_size
    model = create_classifier(enc_cfg, num_classes, global_pool=cfg.model.global_pool,
                              drop_path_rate=cfg.model.drop_path_rate, img_size=enc_cfg["img_size"])
    report = load_encoder_into(model, source.state_dict) if source.state_dict is not None else None
    trunc_normal_(model.head.weight, std=cfg.model.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model, enc_cfg, report


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(mixup_fn or None, training loss): SoftTargetCrossEntropy with mixup/cutmix, else label-smoothing CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

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
    cfg = parse_cli(FinetuneConfig, argv, "finetune.py")
    run_dir = Path(cfg.run.output_dir)

    # ---------------------------------------------------------------- checks before anything is built or trained
    train_info = labelled_split(cfg.data.path, cfg.data.train_split, cfg.num_classes)
    test_info = labelled_split(cfg.data.path, cfg.data.test_split, cfg.num_classes)
    num_classes = check_same_classes(train_info, test_info)
    source = resolve_encoder(cfg.encoder, weights=cfg.encoder_weights, arch=cfg.arch, num_heads=cfg.num_heads,
                             seed=cfg.run.seed)
    micro = micro_batch_size(cfg.data.batch_size, world_size_from_env(), cfg.optim.grad_accum_steps)

    from accelerate.utils import set_seed

    from data.eval_stream import build_eval_loader
    from data.train_stream import build_train_loader
    from data.transforms import default_crop_pct, eval_transform, finetune_transform
    from launch.accel import build_accelerator, input_dtype
    from launch.checkpoint import model_fingerprint
    from launch.param_groups import param_groups
    from launch.schedule import apply_lr, lr_at

    accelerator = build_accelerator(cfg.run, cfg.optim, micro)
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro = micro_batch_size(cfg.data.batch_size, world, cfg.optim.grad_accum_steps)
    if cfg.aug.mixup_active and micro % 2:
        raise ConfigError(f"mixup/cutmix need an even per-process batch; data.batch_size={cfg.data.batch_size} gives "
                          f"{micro} per process (set aug.mixup=0 aug.cutmix=0 or change the batch size)")
    set_seed(cfg.run.seed)
    model, enc_cfg, report = build_classifier(source, cfg, num_classes)
    img_size = enc_cfg["img_size"] if isinstance(enc_cfg["img_size"], int) else enc_cfg["img_size"][0]
    mean, std = norm_stats(cfg.data.mean, cfg.data.std, train_info)
    crop_pct = cfg.data.crop_pct if cfg.data.crop_pct is not None else default_crop_pct(img_size)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        for note in source.notes:
            print(f"[{Path(__file__).stem}] note: {note}")
        if report is not None:
            print(f"[finetune] encoder from {cfg.encoder}: {report}")
    fingerprint = model_fingerprint(model)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), lr=0.0,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if cfg.ema.enabled:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        accelerator.register_for_checkpointing(ema)
    mixup_fn, criterion = build_criterion(cfg, num_classes)
    ckpt, logger, step, best_top1, data_pos = open_run(accelerator, cfg, run_dir, fingerprint, "finetune")
    accelerator.init_trackers("finetune")

    train_tf = finetune_transform(img_size, mean, std, auto_augment=cfg.aug.auto_augment, reprob=cfg.aug.reprob)
    loader = build_train_loader(split_spec(cfg.data.path, cfg.data.train_split), batch_size=micro, transform=train_tf,
                                seed=cfg.run.seed, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                start_batch=data_pos, shuffle_buffer=cfg.data.shuffle_buffer)
    etf = eval_transform(img_size, mean, std, crop_pct)
    in_dtype = input_dtype(accelerator)

    def run_eval(desc: str = "eval") -> dict:
        test_loader = build_eval_loader(split_spec(cfg.data.path, cfg.data.test_split),
                                        batch_size=cfg.data.eval_batch_size, transform=etf, rank=rank,
                                        world_size=world, num_workers=cfg.data.num_workers)
        result = evaluate_model(model, test_loader, accelerator, progress=cfg.run.progress, desc=desc,
                                input_dtype=in_dtype)
        if ema is not None:
            ema_result = evaluate_model(ema.module, test_loader, accelerator, progress=cfg.run.progress,
                                        desc=desc + " (ema)", input_dtype=in_dtype)
            result["ema"] = {k: ema_result[k] for k in ("top1", "top5", "n_images")}
        return result

    meta = {"kind": "vit", "encoder_cfg": enc_cfg, "num_classes": num_classes, "global_pool": cfg.model.global_pool,
            "img_size": img_size, "mean": list(mean), "std": list(std), "crop_pct": crop_pct,
            "class_names": train_info.class_names, "encoder": source.describe()}

    def save_weights(name: str) -> None:
        state = accelerator.get_state_dict(model)  # all ranks (ZeRO-3 gathers)
        if accelerator.is_main_process:
            save_classifier(state, run_dir / name, {**meta, "step": step})
            if ema is not None:
                save_classifier(ema.module.state_dict(), run_dir / name.replace("classifier_", "classifier_ema_"),
                                {**meta, "step": step})

    # ---------------------------------------------------------------- training loop
    model.train()
    total, accum = cfg.run.steps, cfg.optim.grad_accum_steps
    peak_lr = cfg.optim.peak_lr(cfg.data.batch_size)  # data.batch_size is the whole batch of a step
    batches = iter(loader)
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not (cfg.run.progress and accelerator.is_main_process))
    t_last, seen, nonfinite = time.time(), 0, 0
    while step < total:
        lr = lr_at(step, peak_lr=peak_lr, warmup_steps=cfg.optim.warmup_steps, total_steps=total,
                   min_lr=cfg.optim.min_lr)
        apply_lr(optimizer, lr)
        for _ in range(accum):
            batch = next(batches)
            images = batch["image"].to(dev, non_blocking=True)
            labels = batch["label"].to(dev, non_blocking=True)
            if bool((labels < 0).any()):
                raise ConfigError(f"split '{cfg.data.train_split}' has unlabelled images (label -1)")
            targets = labels
            if mixup_fn is not None:
                images, targets = mixup_fn(images, labels)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(images.to(in_dtype))
                loss = criterion(logits.float(), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(labels)
        step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=step)
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            loss_val = accelerator.reduce(loss.detach(), reduction="mean").item()
            nonfinite = nonfinite + 1 if not torch.isfinite(torch.tensor(loss_val)) else 0
            if nonfinite >= cfg.run.max_nonfinite:
                raise RuntimeError(f"loss non-finite at {nonfinite} consecutive log steps (step {step}); "
                                   "lower the lr or enable optim.clip_grad")
            dt = max(time.time() - t_last, 1e-9)
            logger.log(step, {"loss": loss_val, "lr": lr, "images_per_sec": seen * world / dt})
            bar.set_postfix(loss=f"{loss_val:.3f}")
            t_last, seen = time.time(), 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            r = run_eval()
            logger.log(step, {"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]})
            if r["top1"] > best_top1:
                best_top1 = r["top1"]
                save_weights("classifier_best.safetensors")
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total:
            ckpt.save(step, {"data": loader.state_dict(), "best_top1": best_top1, "config": to_dict(cfg),
                             "fingerprint": fingerprint})
    bar.close()

    result = run_eval()
    logger.log(step, {"test_top1": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"]})
    save_weights("classifier_last.safetensors")
    if result["top1"] > best_top1 or not (run_dir / "classifier_best.safetensors").exists():
        best_top1 = max(best_top1, result["top1"])
        save_weights("classifier_best.safetensors")
    if cfg.run.save_every:
        ckpt.save(step, {"data": loader.state_dict(), "best_top1": best_top1, "config": to_dict(cfg),
                         "fingerprint": fingerprint})
    summary = {"top1": result["top1"], "top5": result["top5"], "n_images": result["n_images"], "loss": result["loss"],
               "best_top1": best_top1, "task": "finetune", "global_pool": cfg.model.global_pool, "steps": step,
               "global_batch": cfg.data.batch_size, "peak_lr": peak_lr, "encoder": source.describe(),
               "data": f"{cfg.data.path}:{cfg.data.test_split}", "num_classes": num_classes, "world_size": world}
    if "ema" in result:
        summary["ema"] = result["ema"]
    write_eval_json(run_dir / "eval.json", summary, accelerator)
    if accelerator.is_main_process:
        print(f"[finetune] {step} steps: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  on "
              f"{result['n_images']} images (best {best_top1:.2f}) -> {run_dir / 'eval.json'}")
    accelerator.wait_for_everyone()
    logger.close()
    return summary


if __name__ == "__main__":
    main()
