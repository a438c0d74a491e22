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

import math
import time

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from data.device_input import device_batches
from data.eval_stream import build_eval_loader
from data.train_stream import build_train_loader
from data.transforms import default_crop_pct, eval_transform, pretrain_transform, uint8_output
from finetune.classifier_io import save_classifier
from finetune.config import LinprobeConfig
from finetune.encoder_source import resolve_encoder
from finetune.evaluation import AccuracyMeter, evaluate_model, write_eval_json
from finetune.features import FeatureCache, cache_key, extract_features
from finetune.probe import ProbeClassifier, build_lars
from finetune.splits import check_same_classes, labelled_split, norm_stats, split_spec
from launch.accel import build_accelerator, configure_deepspeed, input_dtype
from launch.checkpoint import model_fingerprint
from launch.config import ConfigError, parse_cli
from launch.errors import cli
from launch.loop import Hook, TrainLoop
from launch.sections import resolve_batch
from launch.session import open_session
from models.classifier import create_backbone, load_encoder_into
from models.compile import compile_blocks, compile_enabled

PROG = "finetune/linprobe.py"


def build_encoder(source, img_size: int | None):
    """The timm encoder of `source` at `img_size`, with its weights (pos_embed interpolated when the size differs)."""
    cfg = dict(source.encoder_cfg)
    if img_size:
        cfg["img_size"] = img_size
    encoder = create_backbone(cfg)
    if source.state_dict is not None:
        load_encoder_into(encoder, source.state_dict)
    return encoder, cfg


def classifier_meta(cfg: LinprobeConfig, source, enc_cfg: dict, num_classes: int, class_names, mean, std,
                    crop_pct: float) -> dict:
    return {"kind": "probe", "encoder_cfg": enc_cfg, "num_classes": num_classes, "pool": cfg.pool,
            "img_size": enc_cfg["img_size"], "mean": list(mean), "std": list(std), "crop_pct": crop_pct,
            "class_names": class_names, "encoder": source.describe()}


def cached_batches(train_x, train_y, *, global_batch: int, micro: int, accum: int, world: int, rank: int, seed: int,
                   start_micro: int, device):
    """Micro-batches (this rank's rows) of cached features from a seeded permutation per epoch, from micro-step
    `start_micro` on: a pure function of the position, so a resumed run draws exactly what it would have drawn."""
    n_train = len(train_x)
    steps_per_epoch = max(1, n_train // global_batch)
    m = start_micro
    while True:
        opt_step, j = divmod(m, accum)
        epoch, within = divmod(opt_step, steps_per_epoch)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        if n_train >= global_batch:
            rows = perm[within * global_batch: (within + 1) * global_batch]  # [global_batch]
        else:
            rows = perm.repeat(math.ceil(global_batch / n_train))[:global_batch]
        chunk = rows[(j * world + rank) * micro: (j * world + rank + 1) * micro]  # micro-step j, this rank
        yield {"feature": train_x[chunk].to(device), "label": train_y[chunk].to(device)}
        m += 1


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(LinprobeConfig, argv, PROG)

    # checks before anything is built or trained: labelled splits with one class count, an encoder that loads
    train_info = labelled_split(cfg.data.path, cfg.data.train_split, cfg.num_classes)
    test_info = labelled_split(cfg.data.path, cfg.data.test_split, cfg.num_classes)
    num_classes = check_same_classes(train_info, test_info)
    source = resolve_encoder(cfg.encoder, weights=cfg.encoder_weights, arch=cfg.arch, num_heads=cfg.num_heads,
                             seed=cfg.run.seed)

    accelerator = build_accelerator(cfg.run, cfg.optim)
    world, rank, device, accum = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                  cfg.optim.grad_accum_steps)
    micro, global_batch = resolve_batch(cfg.data.micro_batch, cfg.data.global_batch, world, accum)
    configure_deepspeed(accelerator, micro, cfg.optim)
    set_seed(cfg.run.seed)
    encoder, enc_cfg = build_encoder(source, cfg.data.img_size)
    mean, std = norm_stats(cfg.data.mean, cfg.data.std, train_info)
    img_size = enc_cfg["img_size"] if isinstance(enc_cfg["img_size"], int) else enc_cfg["img_size"][0]
    model = ProbeClassifier(encoder, num_classes, pool=cfg.pool).to(device)
    if compile_enabled(cfg.run.compile, device):
        compile_blocks(model.encoder)  # the frozen encoder's forward dominates extraction and the augmented path
    if accelerator.is_main_process:
        for note in source.notes:
            print(f"[linprobe] note: {note}")
    path_used = "cached" if cfg.probe.cached else "augmented"
    crop_pct = cfg.data.crop_pct if cfg.data.crop_pct is not None else default_crop_pct(img_size)
    output = uint8_output(train_info.meta, enc_cfg.get("in_chans", 3))  # 8-bit RGB: uint8, normalised on the device
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    etf = eval_transform(img_size, mean, std, crop_pct, output=output)
    dtype = input_dtype(accelerator)  # DeepSpeed converts the head to bf16/fp16, not its inputs

    def eval_batches(split: str):
        loader = build_eval_loader(split_spec(cfg.data.path, split), batch_size=cfg.data.eval_batch_size,
                                   transform=etf, rank=rank, world_size=world, num_workers=cfg.data.num_workers)
        return device_batches(loader, device, mean=mean, std=std), len(loader)

    # features of both splits, extracted once (cached path)
    feats = {}
    if cfg.probe.cached:
        cache = FeatureCache(cfg.run.output_dir)
        for split, info in ((cfg.data.train_split, train_info), (cfg.data.test_split, test_info)):
            key = cache_key(encoder_identity=source.identity, urls=info.urls, transform=etf, pool=cfg.pool,
                            extra={"img_size": img_size, "split": split})
            hit = None if cfg.probe.rebuild_cache else cache.load(split, key)
            if hit is None:
                t0 = time.time()
                batches, total = eval_batches(split)
                hit = extract_features(model.encoder, batches, accelerator, cfg.pool, desc=f"features {split}",
                                       progress=cfg.run.progress, total=total)
                if accelerator.is_main_process:
                    cache.save(split, key, *hit)
                    print(f"[linprobe] extracted {len(hit[0])} {split} features in {time.time() - t0:.1f}s -> "
                          f"{cache.path(split)}")
                accelerator.wait_for_everyone()
            elif accelerator.is_main_process:
                print(f"[linprobe] using cached {split} features ({len(hit[0])}) from {cache.path(split)}")
            feats[split] = hit
        n_train = len(feats[cfg.data.train_split][0])
        if train_info.num_samples and n_train != train_info.num_samples:
            raise RuntimeError(f"extracted {n_train} train features but the split has {train_info.num_samples} images")
        if bool((feats[cfg.data.train_split][1] < 0).any()):
            raise ConfigError(f"split '{cfg.data.train_split}' has unlabelled images (label -1)")

    # the head, its optimizer, the run (resumed when a checkpoint exists)
    head = model.head
    fingerprint = model_fingerprint(head)
    optimizer = build_lars(head, weight_decay=cfg.optim.weight_decay, momentum=cfg.probe.momentum,
                           trust_coeff=cfg.probe.trust_coeff)
    head, optimizer = accelerator.prepare(head, optimizer)
    session = open_session(accelerator, cfg, fingerprint=fingerprint, name="linprobe")
    run_dir, best = session.run_dir, {"top1": float(session.state.get("best_top1", -1.0))}

    loader = None
    if cfg.probe.cached:
        train_x, train_y = feats[cfg.data.train_split]
        batches = cached_batches(train_x, train_y, global_batch=global_batch, micro=micro, accum=accum, world=world,
                                 rank=rank, seed=cfg.run.seed, start_micro=session.start_step * accum, device=device)

        def step_fn(batch: dict) -> torch.Tensor:
            return F.cross_entropy(head(batch["feature"].to(dtype)).float(), batch["label"])
    else:
        # the recipe: RandomResizedCrop + flip
        ttf = pretrain_transform(img_size, mean, std, scale=(0.08, 1.0), output=output)
        loader = build_train_loader(split_spec(cfg.data.path, cfg.data.train_split), batch_size=micro, transform=ttf,
                                    seed=cfg.run.seed, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                    shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=pin)
        if session.resumed:
            loader.load_state_dict({**session.state.get("loader", {}), "batches": session.start_step * accum})
        batches = device_batches(loader, device, mean=mean, std=std, dtype=dtype, pin_memory=pin,
                                 prefetch=cfg.data.prefetch)

        def step_fn(batch: dict) -> torch.Tensor:
            return F.cross_entropy(head(model.features(batch["image"]).to(dtype)).float(), batch["label"])

    def run_eval() -> dict:
        if not cfg.probe.cached:
            eval_iter, total = eval_batches(cfg.data.test_split)
            return evaluate_model(model, eval_iter, accelerator, total=total, progress=cfg.run.progress)
        test_x, test_y = feats[cfg.data.test_split]
        head.eval()
        meter = AccuracyMeter(device=device)
        idx = torch.arange(rank, len(test_x), world)  # every row once across ranks
        with torch.no_grad():
            for i in range(0, len(idx), cfg.data.eval_batch_size):
                sel = idx[i: i + cfg.data.eval_batch_size]
                logits = head(test_x[sel].to(device, dtype)).float()
                y = test_y[sel].to(device)
                meter.update(logits, y, None, F.cross_entropy(logits, y.clamp(min=0), reduction="none"))
        head.train()
        return meter.compute(accelerator)

    meta = {"kind": "probe", "encoder_cfg": enc_cfg, "num_classes": num_classes, "pool": cfg.pool,
            "img_size": img_size, "mean": list(mean), "std": list(std), "crop_pct": crop_pct,
            "class_names": train_info.class_names, "encoder": source.describe()}

    def save_weights(name: str) -> None:
        state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
        state.update({f"head.{k}": v for k, v in accelerator.unwrap_model(head).state_dict().items()})
        if accelerator.is_main_process:
            save_classifier(state, run_dir / name, meta)

    def evaluate_hook(step: int) -> dict | None:
        if step >= cfg.run.steps:  # the final evaluation follows the loop
            return None
        r = run_eval()
        if r["top1"] > best["top1"]:
            best["top1"] = r["top1"]
            save_weights("classifier_best.safetensors")
        return {"test_top1": r["top1"], "test_top5": r["top5"]}

    def save(step: int, loop_state: dict):
        position = {"batches": step * accum} if loader is None else {**loader.state_dict(), "batches": step * accum}
        return session.ckpt.save(step, {**loop_state, "best_top1": best["top1"], "config": session.config,
                                        "fingerprint": fingerprint, "loader": position})

    loop = TrainLoop(accelerator=accelerator, model=head, optimizer=optimizer, step_fn=step_fn, batches=batches,
                     run=cfg.run, optim=cfg.optim, peak_lr=cfg.optim.peak_lr(global_batch), global_batch=global_batch,
                     metrics=session.metrics, save=save, hooks=[Hook(cfg.probe.eval_every, evaluate_hook)],
                     desc=f"linprobe ({path_used})")
    done = loop.fit(session.start_step, session.state)
    if done.stopped_by:
        return session.stopped("linprobe", done, accelerator.is_main_process)

    result = run_eval()
    session.metrics.log(done.step, {"test_top1": result["top1"], "test_top5": result["top5"],
                                    "test_loss": result["loss"]})
    save_weights("classifier_last.safetensors")
    if result["top1"] > best["top1"] or not (run_dir / "classifier_best.safetensors").exists():
        best["top1"] = max(best["top1"], result["top1"])
        save_weights("classifier_best.safetensors")
    summary = {"top1": result["top1"], "top5": result["top5"], "n_images": result["n_images"],
               "n_corrupt": result["n_corrupt"],
               "loss": result["loss"], "best_top1": best["top1"], "task": "linprobe", "path": path_used,
               "pool": cfg.pool, "steps": done.step, "global_batch": global_batch,
               "peak_lr": cfg.optim.peak_lr(global_batch), "encoder": source.describe(),
               "data": f"{cfg.data.path}:{cfg.data.test_split}", "num_classes": num_classes, "world_size": world}
    write_eval_json(run_dir / "eval.json", summary, accelerator)
    if accelerator.is_main_process:
        print(f"[linprobe] {path_used} path, {done.step} steps: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  "
              f"on {result['n_images']} images -> {run_dir / 'eval.json'}")
    accelerator.wait_for_everyone()
    session.close()
    return summary


if __name__ == "__main__":
    cli(PROG, main)()
