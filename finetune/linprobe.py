"""Linear probing of a frozen encoder: `accelerate launch finetune/linprobe.py [CONFIG.yaml] [key=value ...]`.

Frozen encoder -> CLS token (or `pool=avg`) -> BatchNorm1d(affine=False) -> Linear, trained with LARS (timm), no
weight decay, warmup + cosine (the MAE recipe). Two paths:
* cached (default, `probe.cached=true`): features of both splits are extracted once with the eval transform and
  cached in `RUN_DIR/features/` (keyed by encoder hash, dataset and transform); the head trains on them, which takes
  seconds. Each step draws the global batch from a seeded per-epoch permutation; every rank takes its slice.
* augmented (`probe.cached=false`): RandomResizedCrop + flip through the streaming loader and an encoder forward every
  step, as the recipe does.
Writes `eval.json` (top1, top5, n_images, path used, encoder), `classifier_{best,last}.safetensors` (encoder + head,
rebuildable from `classifier.json`), metrics.jsonl and resumable checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not from finetune/
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from finetune.classifier_io import save_classifier
from finetune.config import LinprobeConfig
from finetune.encoder_source import resolve_encoder
from finetune.eval_loop import evaluate_model, write_eval_json
from finetune.resume import open_run
from finetune.features import FeatureCache, cache_key, extract_features
from finetune.probe_model import ProbeClassifier
from finetune.probe_optim import build_lars
from finetune.splits import check_same_classes, labelled_split, norm_stats, split_spec
from finetune.topk import AccuracyMeter
from launch.config import ConfigError, parse_cli, save_config, to_dict


def world_size_from_env() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def micro_batch_size(global_batch: int, world: int, accum: int) -> int:
    if global_batch % (world * accum):
        raise ConfigError(f"data.batch_size={global_batch} is not divisible by processes ({world}) x "
                          f"optim.grad_accum_steps ({accum})")
    return global_batch // (world * accum)


def probe_train_transform(img_size: int, mean, std):
    """The probe recipe's augmentation: RandomResizedCrop (bicubic) + horizontal flip, no colour changes."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def build_encoder(source, img_size: int | None):
    """The timm encoder of `source` at `img_size`, with its weights (pos_embed interpolated when the size differs)."""
    from models.classifier import load_encoder_into
    from models.vit import create_encoder

    cfg = dict(source.encoder_cfg)
    if img_size:
        cfg["img_size"] = img_size
    encoder = create_encoder(**cfg)
    if source.state_dict is not None:
        load_encoder_into(encoder, source.state_dict)
    return encoder, cfg


def classifier_meta(cfg: LinprobeConfig, source, enc_cfg: dict, num_classes: int, class_names, mean, std,
                    crop_pct: float) -> dict:
    return {"kind": "probe", "encoder_cfg": enc_cfg, "num_classes": num_classes, "pool": cfg.pool,
            "img_size": enc_cfg["img_size"], "mean": list(mean), "std": list(std), "crop_pct": crop_pct,
            "class_names": class_names, "encoder": source.describe()}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(LinprobeConfig, argv, "linprobe.py")
    run_dir = Path(cfg.run.output_dir)

    # ---------------------------------------------------------------- checks before anything is built or trained
    train_info = labelled_split(cfg.data.path, cfg.data.train_split, cfg.num_classes)
    test_info = labelled_split(cfg.data.path, cfg.data.test_split, cfg.num_classes)
    num_classes = check_same_classes(train_info, test_info)
    source = resolve_encoder(cfg.encoder, weights=cfg.encoder_weights, arch=cfg.arch, num_heads=cfg.num_heads,
                             seed=cfg.run.seed)
    world = world_size_from_env()
    micro = micro_batch_size(cfg.data.batch_size, world, cfg.optim.grad_accum_steps)

    from accelerate.utils import set_seed

    from data.eval_stream import build_eval_loader
    from data.transforms import default_crop_pct, eval_transform
    from launch.accel import build_accelerator, input_dtype
    from launch.checkpoint import model_fingerprint
    from launch.schedule import apply_lr, lr_at

    accelerator = build_accelerator(cfg.run, cfg.optim, micro)
    world = accelerator.num_processes  # what the launcher really started (`--cpu --num_processes 2` runs one)
    micro = micro_batch_size(cfg.data.batch_size, world, cfg.optim.grad_accum_steps)
    set_seed(cfg.run.seed)
    encoder, enc_cfg = build_encoder(source, cfg.data.img_size)
    mean, std = norm_stats(cfg.data.mean, cfg.data.std, train_info)
    img_size = enc_cfg["img_size"] if isinstance(enc_cfg["img_size"], int) else enc_cfg["img_size"][0]
    model = ProbeClassifier(encoder, num_classes, pool=cfg.pool)
    model.to(accelerator.device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        for note in source.notes:
            print(f"[{Path(__file__).stem}] note: {note}")
    path_used = "cached" if cfg.probe.cached else "augmented"
    rank, dev = accelerator.process_index, accelerator.device
    crop_pct = cfg.data.crop_pct if cfg.data.crop_pct is not None else default_crop_pct(img_size)
    etf = eval_transform(img_size, mean, std, crop_pct)

    def eval_loader(info_split: str):
        return build_eval_loader(split_spec(cfg.data.path, info_split), batch_size=cfg.data.eval_batch_size,
                                 transform=etf, rank=rank,
                                 world_size=accelerator.num_processes, num_workers=cfg.data.num_workers)

    # ---------------------------------------------------------------- features (cached path)
    train_x = train_y = test_x = test_y = None
    if cfg.probe.cached:
        cache = FeatureCache(run_dir)
        feats = {}
        for split, info in ((cfg.data.train_split, train_info), (cfg.data.test_split, test_info)):
            key = cache_key(encoder_identity=source.identity, urls=info.urls, transform=etf, pool=cfg.pool,
                            extra={"img_size": img_size, "split": split})
            hit = None if cfg.probe.rebuild_cache else cache.load(split, key)
            if hit is None:
                t0 = time.time()
                hit = extract_features(model.encoder, eval_loader(split), accelerator, cfg.pool,
                                       desc=f"features {split}", progress=cfg.run.progress)
                if accelerator.is_main_process:
                    cache.save(split, key, *hit)
                    print(f"[linprobe] extracted {len(hit[0])} {split} features in {time.time() - t0:.1f}s -> "
                          f"{cache.path(split)}")
                accelerator.wait_for_everyone()
            elif accelerator.is_main_process:
                print(f"[linprobe] using cached {split} features ({len(hit[0])}) from {cache.path(split)}")
            feats[split] = hit
        train_x, train_y = feats[cfg.data.train_split]
        test_x, test_y = feats[cfg.data.test_split]
        if info_n := train_info.num_samples:
            if len(train_x) != info_n:
                raise RuntimeError(f"extracted {len(train_x)} train features but the split has {info_n} images")
        if bool((train_y < 0).any()):
            raise ConfigError(f"split '{cfg.data.train_split}' has unlabelled images (label -1)")

    # ---------------------------------------------------------------- head, optimizer, resume
    head = model.head
    fingerprint = model_fingerprint(head)
    in_dtype = input_dtype(accelerator)  # DeepSpeed converts the head to bf16/fp16, not its inputs
    optimizer = build_lars(head, weight_decay=cfg.optim.weight_decay, momentum=cfg.probe.momentum,
                           trust_coeff=cfg.probe.trust_coeff)
    head, optimizer = accelerator.prepare(head, optimizer)
    peak_lr = cfg.optim.peak_lr(cfg.data.batch_size)  # data.batch_size is the whole batch of a step
    ckpt, logger, step, best_top1, data_pos = open_run(accelerator, cfg, run_dir, fingerprint, "linprobe")
    accelerator.init_trackers("linprobe")

    # ---------------------------------------------------------------- batches
    accum = cfg.optim.grad_accum_steps
    if cfg.probe.cached:
        n_train = len(train_x)
        per_micro = micro

        def micro_batches(start_micro: int):
            """Micro-batches (this rank's rows) from a seeded permutation per epoch, from micro-step `start_micro`."""
            gb = cfg.data.batch_size
            steps_per_epoch = max(1, n_train // gb)
            m = start_micro
            while True:
                opt_step, j = divmod(m, accum)
                epoch, within = divmod(opt_step, steps_per_epoch)
                g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + epoch)
                perm = torch.randperm(n_train, generator=g)
                rows = perm[within * gb: (within + 1) * gb] if n_train >= gb else perm.repeat(math.ceil(gb / n_train))[:gb]
                # [gb] -> this micro-step j and this rank: contiguous chunk of size per_micro
                chunk = rows[(j * world + rank) * per_micro: (j * world + rank + 1) * per_micro]
                yield train_x[chunk].to(dev), train_y[chunk].to(dev)
                m += 1

        batches = micro_batches(step * accum)
    else:
        from data.train_stream import build_train_loader

        ttf = probe_train_transform(img_size, mean, std)
        spec = split_spec(cfg.data.path, cfg.data.train_split)
        loader = build_train_loader(spec, batch_size=micro, transform=ttf, seed=cfg.run.seed, rank=rank,
                                    world_size=accelerator.num_processes, num_workers=cfg.data.num_workers,
                                    start_batch=data_pos, shuffle_buffer=cfg.data.shuffle_buffer)

        def stream_batches():
            for batch in loader:
                labels = batch["label"].to(dev)
                if bool((labels < 0).any()):
                    raise ConfigError(f"split '{cfg.data.train_split}' has unlabelled images (label -1)")
                yield model.features(batch["image"].to(dev, non_blocking=True)).float(), labels

        batches = stream_batches()

    def run_eval() -> dict:
        if cfg.probe.cached:
            head.eval()
            meter = AccuracyMeter(device=dev)
            idx = torch.arange(rank, len(test_x), accelerator.num_processes)  # every row once across ranks
            with torch.no_grad():
                for i in range(0, len(idx), cfg.data.eval_batch_size):
                    sel = idx[i: i + cfg.data.eval_batch_size]
                    logits = head(test_x[sel].to(dev, in_dtype)).float()
                    y = test_y[sel].to(dev)
                    meter.update(logits, y, None, F.cross_entropy(logits, y.clamp(min=0), reduction="none"))
            head.train()
            return meter.compute(accelerator)
        return evaluate_model(model, eval_loader(cfg.data.test_split), accelerator, progress=cfg.run.progress,
                              desc="eval")

    def save_weights(name: str) -> None:
        state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
        state.update({f"head.{k}": v for k, v in accelerator.unwrap_model(head).state_dict().items()})
        if accelerator.is_main_process:
            save_classifier(state, run_dir / name, classifier_meta(cfg, source, enc_cfg, num_classes,
                                                                   train_info.class_names, mean, std, crop_pct))

    # ---------------------------------------------------------------- training loop
    head.train()
    total = cfg.run.steps
    bar = tqdm(total=total, initial=step, desc=f"linprobe ({path_used})",
               disable=not (cfg.run.progress and accelerator.is_main_process))
    t_last, loss_val, result = time.time(), float("nan"), None
    seen = 0
    while step < total:
        lr = lr_at(step, peak_lr=peak_lr, warmup_steps=cfg.optim.warmup_steps, total_steps=total,
                   min_lr=cfg.optim.min_lr)
        apply_lr(optimizer, lr)
        for _ in range(accum):
            x, y = next(batches)
            with accelerator.accumulate(head):
                with accelerator.autocast():
                    loss = F.cross_entropy(head(x.to(in_dtype)).float(), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(y)
        step += 1
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            loss_val = accelerator.reduce(loss.detach(), reduction="mean").item()
            dt = max(time.time() - t_last, 1e-9)
            logger.log(step, {"loss": loss_val, "lr": lr, "samples_per_sec": seen * accelerator.num_processes / dt})
            bar.set_postfix(loss=f"{loss_val:.3f}")
            t_last, seen = time.time(), 0
        if cfg.probe.eval_every and step % cfg.probe.eval_every == 0 and step < total:
            r = run_eval()
            logger.log(step, {"test_top1": r["top1"], "test_top5": r["top5"]})
            if r["top1"] > best_top1:
                best_top1 = r["top1"]
                save_weights("classifier_best.safetensors")
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total:
            data_state = {"batches": step * accum} if cfg.probe.cached else loader.state_dict()
            ckpt.save(step, {"data": data_state, "best_top1": best_top1, "config": to_dict(cfg),
                             "fingerprint": fingerprint})
    bar.close()

    result = run_eval()
    logger.log(step, {"test_top1": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"]})
    save_weights("classifier_last.safetensors")
    if result["top1"] > best_top1 or not (run_dir / "classifier_best.safetensors").exists():
        best_top1 = max(best_top1, result["top1"])
        save_weights("classifier_best.safetensors")
    summary = {"top1": result["top1"], "top5": result["top5"], "n_images": result["n_images"],
               "loss": result["loss"], "best_top1": best_top1, "task": "linprobe", "path": path_used,
               "pool": cfg.pool, "steps": step, "global_batch": cfg.data.batch_size, "peak_lr": peak_lr,
               "encoder": source.describe(), "data": f"{cfg.data.path}:{cfg.data.test_split}",
               "num_classes": num_classes, "world_size": accelerator.num_processes}
    write_eval_json(run_dir / "eval.json", summary, accelerator)
    if accelerator.is_main_process:
        print(f"[linprobe] {path_used} path, {step} steps: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  "
              f"on {result['n_images']} images -> {run_dir / 'eval.json'}")
    accelerator.wait_for_everyone()
    logger.close()
    return summary


if __name__ == "__main__":
    main()
