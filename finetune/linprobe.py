"""Probing a frozen encoder: `accelerate launch finetune/linprobe.py [CONFIG.yaml] [key=value ...]`.

`probe.head=linear` (default): frozen encoder -> CLS token (or `model.pool=avg`) -> BatchNorm1d(affine=False) ->
Linear, trained with LARS (timm), no weight decay, warmup + cosine (the MAE recipe). `probe.head=attentive`
(`finetune/configs/probe_attentive.yaml`): a learned query attends over the frozen patch tokens -> LayerNorm ->
Linear, trained with AdamW, on cached fp16 tokens when they fit `probe.token_memory` of the memory, else streamed
(`models/probe.py`). Two paths:
* cached (default, `probe.cached=true`): features of both splits are extracted once with the eval transform and
  cached in `RUN_DIR/features/` (keyed by encoder hash, dataset and transform); the head trains on them, which takes
  seconds. Each step draws the global batch from a seeded per-epoch permutation; every rank takes its slice.
* augmented (`probe.cached=false`): RandomResizedCrop + flip through the streaming loader and an encoder forward every
  step, as the recipe does.
The run around the loop is `launch/session.py`'s, the evaluation path `finetune/evaluation.py`'s. Writes `eval.json`
(top1, top5, n_images, path used, encoder), `classifier_{best,last}.safetensors` (encoder + head, rebuildable from
`classifier.json`), run.json, metrics.jsonl and resumable checkpoints.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from data.transforms import pretrain_transform
from finetune.config import LinprobeConfig
from finetune.downstream import Downstream, resolve_downstream
from finetune.evaluation import AccuracyMeter, ClassifierEval, evaluate_model
from finetune.export import save_classifier
from finetune.features import FeatureCache, cache_key
from finetune.probe_optim import build_attentive_optimizer, build_lars
from launch.cache_memory import token_cache_plan
from launch.checkpoint import model_fingerprint
from launch.config import parse_cli
from launch.errors import cli
from launch.features import extract_features, extract_tokens
from launch.loop import TrainLoop
from launch.session import Runtime, Session, start_run
from launch.weights import encoder_model
from models.compile import compile_blocks, compile_enabled
from models.flops import vit_flops_per_image
from models.probe import AttentiveProbeClassifier, ProbeClassifier

PROG = "finetune/linprobe.py"


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


def probe_model(cfg: LinprobeConfig, ds: Downstream):
    """The frozen encoder with the probe's head (`probe.head`)."""
    encoder = encoder_model(ds.source, ds.img_size)
    if cfg.probe.head == "attentive":
        return AttentiveProbeClassifier(encoder, ds.num_classes, include_cls=cfg.probe.include_cls,
                                        num_heads=cfg.probe.attn_heads)
    return ProbeClassifier(encoder, ds.num_classes, pool=cfg.model.pool)


def tokens_fit(cfg: LinprobeConfig, rt: Runtime, ds: Downstream, encoder) -> bool:
    """Whether the attentive probe's tokens of both splits fit `probe.token_memory` of the memory (said in a line)."""
    n = (ds.train.num_samples or 0) + (ds.test.num_samples or 0)
    tokens = encoder.patch_embed.num_patches + (encoder.num_prefix_tokens if cfg.probe.include_cls else 0)
    plan = token_cache_plan(n, tokens, encoder.embed_dim, fraction=cfg.probe.token_memory, device=rt.device)
    rt.say(f"[linprobe] {plan}: " + ("cached" if plan.fits else "streamed (an encoder forward every step)"))
    return plan.fits and n > 0


def cached_features(cfg: LinprobeConfig, rt: Runtime, ds: Downstream, model) -> dict:
    """{"train": (features or tokens, labels), "test": ...} of both splits, extracted once (every rank ends with all
    rows) and cached in the run directory (`features/<split>.safetensors`, tokens `<split>.tokens.safetensors`)."""
    cache, feats, tokens = FeatureCache(cfg.run.output_dir), {}, cfg.probe.head == "attentive"
    for split, spec, info in (("train", ds.train_spec, ds.train), ("test", ds.test_spec, ds.test)):
        name = f"{split}.tokens" if tokens else split
        key = cache_key(encoder_identity=ds.source.identity, urls=info.urls, transform=ds.eval_transform(),
                        pool="tokens+cls" if tokens and cfg.probe.include_cls else "tokens" if tokens else
                        cfg.model.pool, extra={"img_size": ds.img_size, "split": spec})
        hit = None if cfg.probe.rebuild_cache else cache.load(name, key)
        if hit is None:
            t0 = time.time()
            batches, total = ds.eval_batches(rt, spec, cfg.data.eval_batch, cfg.data.num_workers)
            if tokens:
                hit = extract_tokens(model.encoder, batches, rt.accelerator, include_prefix=cfg.probe.include_cls,
                                     desc=f"tokens {split}", progress=cfg.run.progress, total=total)
            else:
                hit = extract_features(model.encoder, batches, rt.accelerator, cfg.model.pool,
                                       desc=f"features {split}", progress=cfg.run.progress, total=total)
            if rt.is_main:
                cache.save(name, key, *hit)
            rt.say(f"[linprobe] extracted {len(hit[0])} {split} features in {time.time() - t0:.1f}s -> "
                   f"{cache.path(name)}")
            rt.accelerator.wait_for_everyone()
        else:
            rt.say(f"[linprobe] using cached {split} features ({len(hit[0])}) from {cache.path(name)}")
        feats[split] = hit
    if ds.train.num_samples and len(feats["train"][0]) != ds.train.num_samples:
        raise RuntimeError(f"extracted {len(feats['train'][0])} train features but the split has "
                           f"{ds.train.num_samples} images")
    if bool((feats["train"][1] < 0).any()):
        raise ConfigError(f"data.train={ds.train_spec} has unlabelled images (label -1)")
    return feats


def evaluate_cached(head, feats, rt: Runtime, batch_size: int) -> dict:
    """Top-1/top-5 of the head over the cached test features, every row once across ranks."""
    test_x, test_y = feats["test"]
    head.eval()
    meter = AccuracyMeter(device=rt.device)
    idx = torch.arange(rt.rank, len(test_x), rt.world)  # every row once across ranks
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            sel = idx[i: i + batch_size]
            logits = head(test_x[sel].to(rt.device, rt.dtype)).float()
            y = test_y[sel].to(rt.device)
            meter.update(logits, y, None, F.cross_entropy(logits, y.clamp(min=0), reduction="none"))
    head.train()
    return meter.compute(rt.accelerator)


def train_transform(ds: Downstream):
    """The recipe's augmentation of the augmented path: RandomResizedCrop (0.08-1) + flip."""
    return pretrain_transform(ds.img_size, ds.mean, ds.std, scale=(0.08, 1.0), output=ds.output)


def plan_loader(cfg: LinprobeConfig, place):
    """The training loader `cfg` gives one process (`place`: micro_batch, rank, world, device), or None when the
    head trains on cached features or synthetic batches: what `--plan` times (launch/plan.py)."""
    if cfg.probe.cached or cfg.data.loader == "synthetic":
        return None
    ds = resolve_downstream(cfg)
    return ds.train_loader(place, cfg.data, train_transform(ds), cfg.run.seed)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(LinprobeConfig, argv, PROG)
    ds = resolve_downstream(cfg)  # splits, encoder weights, normalisation: checked before anything is built
    rt = start_run(cfg.run, cfg.optim, micro=cfg.data.micro_batch, global_=cfg.data.global_batch)
    model = probe_model(cfg, ds).to(rt.device)
    if compile_enabled(cfg.run.compile, rt.device) and not ds.source.encoder_cfg.get("pixels"):
        compile_blocks(model.encoder)  # the frozen encoder's forward dominates extraction and the augmented path
    for note in ds.source.notes:
        rt.say(f"[linprobe] note: {note}")
    cached = cfg.probe.cached and (cfg.probe.head == "linear" or tokens_fit(cfg, rt, ds, model.encoder))
    path_used = "cached" if cached else "augmented"
    feats = cached_features(cfg, rt, ds, model) if cached else None
    fingerprint = model_fingerprint(model.head)
    if cfg.probe.head == "attentive":
        optimizer = build_attentive_optimizer(model.head, weight_decay=cfg.optim.weight_decay,
                                              betas=tuple(cfg.optim.betas))
    else:
        optimizer = build_lars(model.head, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                               trust_coeff=cfg.optim.trust_coeff)
    head, optimizer = rt.accelerator.prepare(model.head, optimizer)
    peak_lr = cfg.optim.peak_lr(rt.global_batch)
    head_flops = 3 * sum(p.numel() for p in model.head.parameters()) * 2  # ~ the head's forward and backward
    enc_cfg = ds.source.encoder_cfg
    plain_vit = "hybrid" not in enc_cfg and not enc_cfg.get("pixels")
    # the augmented path runs the frozen encoder forward each step (no backward through it)
    encoder_flops = vit_flops_per_image(dict(enc_cfg, img_size=ds.img_size)) if feats is None and plain_vit else 0
    record = {"peak_lr": peak_lr, "flops_per_image": head_flops + encoder_flops, "data": ds.train_spec}
    with Session(rt, cfg, name="linprobe", fingerprint=fingerprint, record=record) as session:
        if feats is None:  # the recipe: RandomResizedCrop + flip, an encoder forward every step
            batches = ds.train_batches(rt, session, cfg.data, train_transform(ds), cfg.run.seed)

            def step_fn(batch: dict) -> torch.Tensor:
                return F.cross_entropy(head(model.features(batch["image"]).to(rt.dtype)).float(), batch["label"])

            def evaluate() -> dict:
                eval_iter, total = ds.eval_batches(rt, ds.test_spec, cfg.data.eval_batch, cfg.data.num_workers)
                return evaluate_model(model, eval_iter, rt.accelerator, total=total, progress=cfg.run.progress)
        else:
            def step_fn(batch: dict) -> torch.Tensor:
                return F.cross_entropy(head(batch["feature"].to(rt.dtype)).float(), batch["label"])

            def evaluate() -> dict:
                return evaluate_cached(head, feats, rt, cfg.data.eval_batch)

        def save_weights(name: str, step: int) -> None:
            state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
            state.update({f"head.{k}": v for k, v in rt.accelerator.unwrap_model(head).state_dict().items()})
            if rt.is_main:
                meta = ds.meta("probe", dict(ds.source.encoder_cfg, img_size=ds.img_size), cfg.model.pool)
                meta.update(head=cfg.probe.head, step=step)
                if cfg.probe.head == "attentive":
                    meta.update(attn_heads=model.head.num_heads, include_cls=cfg.probe.include_cls)
                save_classifier(state, session.run_dir / name, meta)

        evaluation = ClassifierEval(session, evaluate, save_weights, "linprobe")
        start = session.begin()
        if feats is not None:
            batches = cached_batches(*feats["train"], global_batch=rt.global_batch, micro=rt.micro_batch,
                                     accum=rt.accum, world=rt.world, rank=rt.rank, seed=cfg.run.seed,
                                     start_micro=start * rt.accum, device=rt.device)
        done = TrainLoop(session, head, optimizer, step_fn, batches, peak_lr, hooks=[evaluation.hook()],
                         desc=f"linprobe ({path_used})", flops_per_image=record["flops_per_image"]).fit()
        if done.stopped_by:
            return session.stopped(done)
        return evaluation.finish(done.step, {
            "task": "linprobe", "head": cfg.probe.head, "path": path_used, "pool": cfg.model.pool,
            "global_batch": rt.global_batch, "peak_lr": peak_lr, "encoder": ds.source.describe(), "data": ds.test_spec,
            "num_classes": ds.num_classes, "world_size": rt.world})


if __name__ == "__main__":
    cli(PROG, main)()
