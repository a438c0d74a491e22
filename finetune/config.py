"""Typed configs of the downstream entry points: linear probing, fine-tuning and stand-alone evaluation.

Each entry point composes the shared `RunConfig`/`OptimConfig` with its own sections. Defaults run on the shipped
sample (`data/sample`) on a CPU; the published ImageNet recipes live in `finetune/configs/*.yaml` (in steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launch.config import opt, section
from launch.sections import (
    EVAL_BATCH_HELP,
    GLOBAL_HELP,
    LOG_SAMPLES_HELP,
    MICRO_HELP,
    NORM_HELP,
    POOL_HELP,
    PREFETCH_HELP,
    TEST_HELP,
    TRAIN_HELP,
    OptimConfig,
    RunConfig,
    check_batch_keys,
)

DEFAULT_ENCODER = "runs/pretrain/encoder.safetensors"
IMG_SIZE_HELP = "input resolution (None: the encoder's own; another size interpolates pos_embed)"
CROP_PCT_HELP = "evaluation centre-crop fraction (None: 1.0 up to 64 px, else 0.875)"
# the keys the downstream entry points renamed in round 3 (one key per concept across entry points)
DOWNSTREAM_RENAMED = {
    "data.path": "data.train=FOLDER:SPLIT and data.test=FOLDER:SPLIT",
    "data.train_split": "data.train=FOLDER:SPLIT", "data.test_split": "data.test=FOLDER:SPLIT",
    "data.img_size": "model.img_size", "data.eval_batch_size": "data.eval_batch",
}


@dataclass
class DataSection:
    train: str = opt("data/sample", TRAIN_HELP)
    test: str | None = opt(None, TEST_HELP + "; None: the val split next to data.train, else its test split")
    global_batch: int | None = opt(256, GLOBAL_HELP)
    micro_batch: int | None = opt(None, MICRO_HELP)
    eval_batch: int = opt(256, EVAL_BATCH_HELP)
    num_workers: int = opt(2, "data-loader worker processes per rank")
    mean: tuple[float, ...] | None = opt(None, NORM_HELP.format("mean"))
    std: tuple[float, ...] | None = opt(None, NORM_HELP.format("std"))
    crop_pct: float | None = opt(None, CROP_PCT_HELP)
    shuffle_buffer: int = opt(2000, "training stream shuffle buffer (samples per worker)")
    pin_memory: bool | None = opt(None, "pinned host memory for the batches; None: on with CUDA")
    prefetch: int = opt(1, PREFETCH_HELP)
    loader: Literal["stream", "synthetic"] = opt("stream", "stream: WebDataset shards through loader workers; "
                                                 "synthetic: random uint8 images of the configured shape, no I/O")
    log_samples: bool = opt(False, LOG_SAMPLES_HELP)

    EXCLUSIVE = (("micro_batch", "global_batch"),)

    def __post_init__(self) -> None:
        check_batch_keys(self.micro_batch, self.global_batch)
        if self.eval_batch < 1:
            raise ValueError("eval_batch must be >= 1")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")


@dataclass
class ProbeSection:
    head: Literal["linear", "attentive"] = opt("linear", "linear: pooled feature -> BatchNorm -> Linear (LARS, "
                                               "optim.name=lars); attentive: a learned query attends over the patch "
                                               "tokens -> LayerNorm -> Linear (AdamW, optim.name=adamw; "
                                               "finetune/configs/probe_attentive.yaml)")
    cached: bool = opt(True, "extract features once (eval transform) and train the head on the cache; false: RRC+flip "
                             "through the streaming loader and an encoder forward every step (the recipe)")
    rebuild_cache: bool = opt(False, "re-extract features even when the cache key matches")
    attn_heads: int | None = opt(None, "attentive head's attention heads (None: width / 64)")
    include_cls: bool = opt(False, "attentive head: attend over the CLS token too (default: the patch tokens, as AIM)")
    token_memory: float = opt(0.5, "attentive head: cache the tokens (fp16) when they take at most this fraction of "
                                   "the memory available, else stream them (an encoder forward every step)")

    def __post_init__(self) -> None:
        if not 0 < self.token_memory <= 1 or (self.attn_heads is not None and self.attn_heads < 1):
            raise ValueError("probe.token_memory must be in (0, 1] and probe.attn_heads >= 1")


@dataclass
class ProbeModelSection:
    pool: Literal["token", "avg"] = opt("token", POOL_HELP)
    img_size: int | None = opt(None, IMG_SIZE_HELP)


@dataclass
class LinprobeConfig:
    run: RunConfig = section(RunConfig, "how the run runs", output_dir="runs/linprobe", steps=500, log_every=50,
                             save_every=0)
    # the MAE linear probe: LARS, blr 0.1, no weight decay, warmup + cosine
    optim: OptimConfig = section(OptimConfig, "LARS optimisation", name="lars", blr=0.1, weight_decay=0.0,
                                 warmup_steps=10)
    data: DataSection = section(DataSection, "dataset")
    model: ProbeModelSection = section(ProbeModelSection, "the probed feature")
    probe: ProbeSection = section(ProbeSection, "probe options")
    encoder: str = opt(DEFAULT_ENCODER, "encoder.safetensors | official MAE .pth | timm:NAME (+encoder_weights) | "
                                        "random | pixels (raw pixels, the yardstick; with arch=)")
    encoder_weights: str | None = opt(None, "weights file for encoder=timm:NAME")
    arch: str | None = opt(None, "architecture when the checkpoint does not say: an MAE variant name or timm:NAME "
                                 "(needed by encoder=random unless a default is fine)")
    num_heads: int | None = opt(None, "attention heads when neither the checkpoint nor arch says (default dim/64)")
    num_classes: int | None = opt(None, "classes (None: from dataset.json; a different number is an error)")

    RENAMED = {**DOWNSTREAM_RENAMED, "pool": "model.pool", "probe.eval_every": "run.eval_every",
               "probe.momentum": "optim.momentum", "probe.trust_coeff": "optim.trust_coeff"}

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        want = "lars" if self.probe.head == "linear" else "adamw"
        if self.optim.name != want:
            raise ValueError(f"optim.name={self.optim.name}: the {self.probe.head} probe trains with optim.name={want}"
                             + (" (finetune/configs/probe_attentive.yaml sets it and its lr)" if want == "adamw"
                                else ""))

    def inapplicable(self) -> dict[str, str]:
        out = {}
        if self.probe.head == "linear":
            out.update({f"probe.{k}": "probe.head=linear" for k in ("attn_heads", "include_cls", "token_memory")})
        else:
            out["model.pool"] = "probe.head=attentive attends over the tokens (probe.include_cls), it pools nothing"
        if self.probe.cached:
            out.update({f"data.{k}": "probe.cached=true trains on cached features (no training stream)"
                        for k in ("shuffle_buffer", "pin_memory", "prefetch", "loader")})
        else:
            out["probe.rebuild_cache"] = "probe.cached=false uses no feature cache"
        return out


@dataclass
class ModelSection:
    pool: Literal["token", "avg"] = opt("token", "CLS head, or mean of patch tokens + fc_norm (avg, MAE fine-tuning)")
    img_size: int | None = opt(None, IMG_SIZE_HELP)
    drop_path_rate: float = opt(0.1, "stochastic depth rate")
    head_init_std: float = opt(2e-5, "head weight trunc-normal std (MAE: 2e-5)")

    def __post_init__(self) -> None:
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class AugSection:
    auto_augment: str | None = opt("rand-m9-mstd0.5-inc1", "timm auto-augment policy (None: off)")
    reprob: float = opt(0.25, "random erasing probability")
    mixup: float = opt(0.8, "mixup alpha (0: off)")
    cutmix: float = opt(1.0, "cutmix alpha (0: off)")
    mixup_prob: float = opt(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: Literal["batch", "pair", "elem"] = opt("batch", "how mixup parameters are drawn")
    smoothing: float = opt(0.1, "label smoothing")

    def __post_init__(self) -> None:
        if not 0 <= self.reprob <= 1 or not 0 <= self.smoothing < 1:
            raise ValueError("reprob must be in [0, 1] and smoothing in [0, 1)")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0")

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class EmaSection:
    enabled: bool = opt(False, "keep an EMA of the weights (timm ModelEmaV3), evaluated alongside the model")
    decay: float = opt(0.9999, "EMA decay per optimizer step")
    warmup: bool = opt(False, "timm EMA decay warmup")

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class DistillSection:
    kind: Literal["none", "hard", "soft"] = opt("none", "DeiT distillation: none, hard (cross-entropy on the teacher's "
                                                "argmax) or soft (KL at temperature tau); hard/soft add a "
                                                "distillation token and head to the student")
    teacher: str | None = opt(None, "the teacher: a Tessera classifier (run directory or classifier_*.safetensors "
                                    "beside its classifier.json) or timm:NAME with distill.teacher_weights")
    teacher_weights: str | None = opt(None, "weights file of distill.teacher=timm:NAME (its head must have num_classes "
                                            "outputs)")
    teacher_mean: tuple[float, ...] | None = opt(None, "input normalisation of a timm:NAME teacher (None: its "
                                                                "timm pretrained_cfg's)")
    teacher_std: tuple[float, ...] | None = opt(None, "input normalisation std of a timm:NAME teacher (None: "
                                                               "its timm pretrained_cfg's)")
    tau: float = opt(1.0, "soft distillation temperature (the DeiT code's default: 1.0)")
    alpha: float = opt(0.5, "weight of the distillation loss: (1 - alpha) * CE(cls head) + alpha * distillation "
                            "(dist head) (the DeiT code's default: 0.5)")

    def __post_init__(self) -> None:
        if self.kind != "none" and not self.teacher:
            raise ValueError(f"distill.kind={self.kind} needs distill.teacher= (a classifier run or timm:NAME)")
        if self.kind == "none" and (self.teacher or self.teacher_weights):
            raise ValueError("distill.teacher is set but distill.kind=none: set distill.kind=hard or soft, or drop "
                             "the teacher")
        if self.teacher and self.teacher.startswith("timm:") and not self.teacher_weights:
            raise ValueError(f"distill.teacher={self.teacher} needs distill.teacher_weights=/path/to/weights "
                             "(no downloads here)")
        if self.teacher_weights and not (self.teacher or "").startswith("timm:"):
            raise ValueError("distill.teacher_weights goes with distill.teacher=timm:NAME (a classifier run carries "
                             "its own weights)")
        if (self.teacher_mean is None) != (self.teacher_std is None):
            raise ValueError("give distill.teacher_mean and distill.teacher_std together")
        if self.tau <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError(f"distill.tau must be > 0 and distill.alpha in [0, 1], got {self.tau} and {self.alpha}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass
class FinetuneConfig:
    run: RunConfig = section(RunConfig, "how the run runs", output_dir="runs/finetune", steps=300, log_every=20,
                             save_every=100, eval_every=100)
    # the MAE fine-tuning recipe: AdamW (0.9, 0.999), wd 0.05, layer decay 0.75, warmup + cosine to 1e-6
    optim: OptimConfig = section(OptimConfig, "AdamW optimisation with layer-wise lr decay", blr=5e-4, min_lr=1e-6,
                                 warmup_steps=20, betas=(0.9, 0.999), layer_decay=0.75)
    data: DataSection = section(DataSection, "dataset", global_batch=128)
    model: ModelSection = section(ModelSection, "classifier")
    aug: AugSection = section(AugSection, "augmentation")
    ema: EmaSection = section(EmaSection, "weight EMA")
    distill: DistillSection = section(DistillSection, "DeiT distillation from a frozen teacher")
    encoder: str = opt(DEFAULT_ENCODER, "encoder.safetensors | MAE .pth | timm:NAME (+encoder_weights) | random "
                                        "(scratch)")
    encoder_weights: str | None = opt(None, "weights file for encoder=timm:NAME")
    arch: str | None = opt(None, "architecture when the checkpoint does not say: an MAE variant name, a hybrid ViT "
                                 "(vit_tiny_convstem_p4_32, timm:vit_small_r26_s32_224, ...; models/hybrid.py) or "
                                 "timm:NAME (a ViT; a CNN such as timm:resnet18 with encoder=random)")
    num_heads: int | None = opt(None, "attention heads when neither the checkpoint nor arch says (default dim/64)")
    num_classes: int | None = opt(None, "classes (None: from dataset.json; a different number is an error)")

    RENAMED = {**DOWNSTREAM_RENAMED, "eval_every": "run.eval_every", "model.global_pool": "model.pool"}

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if self.distill.active and self.model.pool != "token":
            raise ValueError("distillation reads the CLS and distillation tokens: set model.pool=token")
        if self.optim.name != "adamw":
            raise ValueError(f"optim.name={self.optim.name}: fine-tuning trains with AdamW (optim.name=adamw)")

    def inapplicable(self) -> dict[str, str]:
        out = {}
        if not self.ema.enabled:
            out.update({f"ema.{k}": "ema.enabled=false" for k in ("decay", "warmup")})
        if not self.distill.active:
            out.update({f"distill.{k}": "distill.kind=none" for k in ("teacher_mean", "teacher_std", "tau", "alpha")})
        if not self.aug.mixup_active:
            out.update({f"aug.{k}": "mixup and cutmix are off (aug.mixup=0 aug.cutmix=0)"
                        for k in ("mixup_prob", "mixup_switch_prob", "mixup_mode")})
        return out


@dataclass
class EvalDataSection:
    test: str = opt("data/sample:test", TEST_HELP)
    eval_batch: int = opt(256, EVAL_BATCH_HELP)
    num_workers: int = opt(2, "data-loader workers per rank")

    def __post_init__(self) -> None:
        if self.eval_batch < 1 or self.num_workers < 0:
            raise ValueError("eval_batch must be >= 1 and num_workers >= 0")


@dataclass
class EvalRunSection:
    precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "mixed precision; auto = bf16 on GPU, fp32 on CPU")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class EvaluateConfig:
    checkpoint: str = opt("runs/finetune/classifier_best.safetensors",
                          "saved classifier (.safetensors beside its classifier.json) or its run directory")
    data: EvalDataSection = section(EvalDataSection, "the evaluated split")
    run: EvalRunSection = section(EvalRunSection, "precision and progress")
    output: str | None = opt(None, "where to write the JSON (None: eval-<checkpoint name>-<split>.json beside it)")

    RENAMED = {"batch_size": "data.eval_batch", "num_workers": "data.num_workers", "precision": "run.precision",
               "progress": "run.progress", "data": "data.test=FOLDER:SPLIT"}


__all__ = ["DataSection", "ProbeSection", "ProbeModelSection", "LinprobeConfig", "ModelSection", "AugSection",
           "EmaSection", "DistillSection", "FinetuneConfig", "EvalDataSection", "EvalRunSection", "EvaluateConfig",
           "DEFAULT_ENCODER"]
