"""Supervised fine-tuning of an encoder: `accelerate launch finetune/classify.py [CONFIG.yaml] [key=value ...]`.

The encoder (our encoder.safetensors or a run directory, an official MAE .pth, timm:NAME + weights, or `random` for
from-scratch) goes into a timm VisionTransformer with a class head (`model.pool=avg`: mean of patch tokens + fc_norm,
as MAE fine-tuning), position embeddings interpolated when `model.img_size` differs. The MAE recipe: AdamW with
layer-wise lr decay, warmup + cosine, drop path, timm Mixup/CutMix + SoftTargetCrossEntropy (label-smoothing CE when
mixup is off), RandAugment and random erasing (`data.transforms.finetune_transform`), optional weight EMA (timm
ModelEmaV3). config -> model -> loader -> step function -> the shared loop (`launch/loop.py`) -> export; the run
around it is `launch/session.py`'s, the evaluation path `finetune/evaluation.py`'s (every `run.eval_every` steps and
at the end, over exactly the test split's images). Writes eval.json, `classifier_{best,last}.safetensors` +
classifier.json, run.json, metrics.jsonl and resumable checkpoints.

`arch=` may also name a hybrid ViT (a convolutional stem as the patch embedding, `models/hybrid.py`) or, for training
from scratch (`encoder=random`), a timm CNN such as `timm:resnet18`. `distill.kind=hard|soft` trains a DeiT student
(`finetune/distill.py`): a distillation token and head beside CLS learn from a frozen teacher (`distill.teacher=`: a
classifier run, or timm:NAME + `distill.teacher_weights=`) that sees the same mixed images; the teacher's test
accuracy is printed before training; it is never checkpointed or exported with the student.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from core.errors import ConfigError
from data.device_erasing import DeviceRandomErasing, erasing_generator
from data.seeding import mix_seed
from data.transforms import finetune_transform
from finetune.config import FinetuneConfig
from finetune.distill import distillation_loss, load_teacher
from finetune.downstream import Downstream, resolve_downstream
from finetune.evaluation import ClassifierEval, evaluate_model
from finetune.export import save_classifier
from launch.checkpoint import model_fingerprint
from launch.config import parse_cli
from launch.errors import cli
from launch.loop import TrainLoop
from launch.param_groups import build_adamw, param_groups
from launch.session import Runtime, Session, start_run
from models.classifier import create_classifier, init_heads, load_encoder_into, timm_args
from models.compile import compile_blocks, compile_enabled
from models.flops import vit_flops_per_image

PROG = "finetune/classify.py"


def build_classifier(ds: Downstream, cfg: FinetuneConfig) -> tuple[nn.Module, dict, dict | None]:
    """(timm classifier with the encoder's weights loaded, its encoder_cfg, the load report). With distillation on,
    a VisionTransformerDistilled in distilled-training mode (its forward returns the two heads' logits)."""
    enc_cfg = dict(ds.source.encoder_cfg, img_size=ds.img_size)
    try:
        model = create_classifier(enc_cfg, ds.num_classes, global_pool=cfg.model.pool,
                                  drop_path_rate=cfg.model.drop_path_rate, img_size=ds.img_size,
                                  distilled=cfg.distill.active)
    except ValueError as exc:  # an architecture/option combination the models refuse, e.g. a distilled CNN
        raise ConfigError(str(exc)) from None
    report = load_encoder_into(model, ds.source.state_dict) if ds.source.state_dict is not None else None
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


def prepare(cfg: FinetuneConfig, rt: Runtime, ds: Downstream):
    """The classifier, its optimizer (prepared), the weight EMA or None, the encoder_cfg and the shape fingerprint."""
    model, enc_cfg, report = build_classifier(ds, cfg)
    for note in ds.source.notes:
        rt.say(f"[finetune] note: {note}")
    if report is not None:
        rt.say(f"[finetune] encoder from {cfg.encoder}: {report}")
    fingerprint = model_fingerprint(model)
    optimizer = build_adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim,
                            deepspeed=rt.deepspeed)
    if compile_enabled(cfg.run.compile, rt.device) and "cnn" not in enc_cfg:
        compile_blocks(model)  # regional: each transformer block (a CNN has none)
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    ema = ModelEmaV3(rt.accelerator.unwrap_model(model), decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) \
        if cfg.ema.enabled else None
    return model, optimizer, ema, enc_cfg, fingerprint


def build_teacher(cfg: FinetuneConfig, rt: Runtime, ds: Downstream):
    """The frozen distillation teacher (never prepared, registered, or attached to the student) and its description;
    its own test accuracy printed before training. (None, None) without distillation."""
    if not cfg.distill.active:
        return None, None
    d = cfg.distill
    teacher, info = load_teacher(d.teacher, weights=d.teacher_weights, num_classes=ds.num_classes,
                                 class_names=ds.train.class_names, student_mean=ds.mean, student_std=ds.std,
                                 mean=d.teacher_mean, std=d.teacher_std)
    info.update(kind=d.kind, tau=d.tau, alpha=d.alpha)
    teacher.to(rt.device, rt.dtype if rt.deepspeed else None)  # DeepSpeed runs the student in bf16 without autocast
    batches, total = ds.eval_batches(rt, ds.test_spec, cfg.data.eval_batch, cfg.data.num_workers)
    r = evaluate_model(teacher, batches, rt.accelerator, total=total, progress=cfg.run.progress, desc="teacher")
    info.update(top1=r["top1"], top5=r["top5"], n_images=r["n_images"])
    rt.say(f"[finetune] teacher {d.teacher} ({info['arch']}): top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  on "
           f"{r['n_images']} test images; {d.kind} distillation, tau {d.tau}, alpha {d.alpha}")
    return teacher, info


def train_transform(cfg: FinetuneConfig, ds: Downstream):
    """The fine-tuning augmentation: RandAugment (`aug.auto_augment`), random erasing (`aug.reprob`)."""
    return finetune_transform(ds.img_size, ds.mean, ds.std, auto_augment=cfg.aug.auto_augment, reprob=cfg.aug.reprob,
                              output=ds.output)


def plan_loader(cfg: FinetuneConfig, place):
    """The training loader `cfg` gives one process (`place`: micro_batch, rank, world, device), or None for
    synthetic batches: what `--plan` times (launch/plan.py)."""
    if cfg.data.loader == "synthetic":
        return None
    ds = resolve_downstream(cfg)
    return ds.train_loader(place, cfg.data, train_transform(cfg, ds), cfg.run.seed)


def step_function(cfg: FinetuneConfig, rt: Runtime, model, ds: Downstream, teacher, start_step: int):
    """(step_fn, log_extra or None): mixup/cutmix, random erasing on the device (seeded by the micro-step, so a
    resumed run erases the same boxes), the loss; with a teacher, the distillation loss and its parts for the log."""
    mixup_fn, criterion = build_criterion(cfg, ds.num_classes)
    erase = DeviceRandomErasing(cfg.aug.reprob) if ds.output == "uint8" and cfg.aug.reprob > 0 else None
    micro_index = [start_step * rt.accum]
    parts = torch.zeros(3, device=rt.device)  # distillation: [sum of CLS-head losses, of distillation losses, count]

    def step_fn(batch: dict) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if erase is not None:
            images = erase(images, erasing_generator(rt.device, mix_seed(cfg.run.seed, "erase", rt.rank,
                                                                         micro_index[0])))
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
        total = rt.accelerator.reduce(parts, reduction="sum") if rt.world > 1 else parts
        base_sum, dist_sum, n = total.tolist()
        parts.zero_()
        return {"loss_cls": base_sum / n, "loss_distill": dist_sum / n} if n else {}

    return step_fn, (log_parts if teacher is not None else None)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(FinetuneConfig, argv, PROG)
    ds = resolve_downstream(cfg)  # splits, encoder weights, normalisation: checked before anything is built
    if ds.source.encoder_cfg.get("pixels"):
        raise ConfigError("encoder=pixels is the probes' yardstick (raw pixels, nothing to train): fine-tune "
                          "encoder=random arch=... for a from-scratch baseline")
    rt = start_run(cfg.run, cfg.optim, micro=cfg.data.micro_batch, global_=cfg.data.global_batch)
    if cfg.ema.enabled and rt.fsdp:  # timm's ModelEmaV3 deep-copies the model, which FSDP2 refuses
        raise ConfigError("ema.enabled=true keeps a whole copy of the weights on every rank, which FSDP2's sharded "
                          "model cannot give; set ema.enabled=false, or use DDP or ZeRO-2 for a weight EMA")
    if cfg.aug.mixup_active and rt.micro_batch % 2:
        raise ConfigError(f"mixup/cutmix need an even micro-batch; the batch config gives {rt.micro_batch} per "
                          f"process (set aug.mixup=0 aug.cutmix=0 or change data.global_batch / data.micro_batch)")
    model, optimizer, ema, enc_cfg, fingerprint = prepare(cfg, rt, ds)
    teacher, teacher_info = build_teacher(cfg, rt, ds)
    peak_lr = cfg.optim.peak_lr(rt.global_batch)
    plain_vit = "cnn" not in enc_cfg and "hybrid" not in enc_cfg
    flops = 3 * vit_flops_per_image(enc_cfg) if plain_vit else None  # forward + backward; stems are not counted
    record = {"peak_lr": peak_lr, "flops_per_image": flops, "data": ds.train_spec}
    with Session(rt, cfg, name="finetune", fingerprint=fingerprint, record=record) as session:
        if ema is not None:
            session.register("ema", ema)
        batches = ds.train_batches(rt, session, cfg.data, train_transform(cfg, ds), cfg.run.seed)
        kind = "distilled" if cfg.distill.active else "cnn" if "cnn" in enc_cfg else "vit"
        timm_name, timm_kwargs = timm_args(enc_cfg, ds.num_classes, cfg.model.pool, distilled=cfg.distill.active)
        meta = {**ds.meta(kind, enc_cfg, cfg.model.pool), "timm": {"name": timm_name, "kwargs": timm_kwargs},
                **({"distill": teacher_info} if teacher_info else {})}

        def evaluate() -> dict:
            out = {}
            for name, net in (("model", model), ("ema", ema.module if ema is not None else None)):
                if net is not None:
                    eval_iter, total = ds.eval_batches(rt, ds.test_spec, cfg.data.eval_batch, cfg.data.num_workers)
                    out[name] = evaluate_model(net, eval_iter, rt.accelerator, total=total, progress=cfg.run.progress,
                                               desc="eval" + (" (ema)" if name == "ema" else ""))
            if "ema" in out:
                out["model"]["ema"] = {k: out["ema"][k] for k in ("top1", "top5", "n_images")}
            return out["model"]

        def save_weights(name: str, step: int) -> None:
            state = rt.accelerator.get_state_dict(model)  # all ranks (ZeRO-3 gathers)
            if rt.is_main:
                save_classifier(state, session.run_dir / name, {**meta, "step": step})
                if ema is not None:
                    save_classifier(ema.module.state_dict(), session.run_dir / name.replace("classifier_",
                                                                                              "classifier_ema_"),
                                    {**meta, "step": step})

        evaluation = ClassifierEval(session, evaluate, save_weights, "finetune")
        step_fn, log_extra = step_function(cfg, rt, model, ds, teacher, session.begin())
        after = (lambda step: ema.update(rt.accelerator.unwrap_model(model), step=step)) if ema else None
        done = TrainLoop(session, model, optimizer, step_fn, batches, peak_lr, hooks=[evaluation.hook()],
                         log_extra=log_extra, after_update=after, desc="finetune", flops_per_image=flops).fit()
        if done.stopped_by:
            return session.stopped(done)
        return evaluation.finish(done.step, {
            "task": "finetune", "pool": cfg.model.pool, "global_batch": rt.global_batch, "peak_lr": peak_lr,
            "encoder": ds.source.describe(), "data": ds.test_spec, "num_classes": ds.num_classes,
            "world_size": rt.world, "arch": enc_cfg.get("cnn") or enc_cfg.get("hybrid") or cfg.arch,
            **({"distill": teacher_info} if teacher_info else {})})


if __name__ == "__main__":
    cli(PROG, main)()
