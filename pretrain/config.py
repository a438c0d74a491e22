"""Typed config of `pretrain/mae.py`: model, data, optimiser, run, and reconstruction pictures.

The dataclass defaults ARE the default run: a small MAE on the shipped CIFAR-10 sample (`data/sample`) that
finishes in a few minutes on a laptop CPU. YAML files under `pretrain/configs/` hold only differences from these
defaults; `key=value` overrides come last (`launch.config.load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml

from launch.config import opt, section
from launch.sections import (
    EVAL_BATCH_HELP,
    GLOBAL_HELP,
    LOG_SAMPLES_HELP,
    MICRO_HELP,
    NORM_HELP,
    POOL_HELP,
    PREFETCH_HELP,
    TRAIN_HELP,
    OptimConfig,
    RunConfig,
    check_batch_keys,
)
from models.hybrid import pretraining_refusal
from models.objectives import DEFAULT_MASKING, check_objective, default_target


@dataclass
class ModelConfig:
    name: str = opt("mae_vit_tiny_patch4_dec128d2b",
                    "MAE variant (models.variants.MAE_VARIANTS), e.g. mae_vit_base_patch16_dec512d8b")
    img_size: int = opt(32, "input resolution (pixels, square)")
    objective: Literal["mae", "simmim", "data2vec"] = opt("mae", "mae (encoder on visible patches + decoder), simmim "
                                                          "(BEiT-style mask tokens, linear head, L1) or data2vec "
                                                          "(mask tokens regress an EMA teacher's features)")
    target: Literal["pixels", "hog"] | None = opt(None, "what mae/simmim regress: pixels or hog (MaskFeat); None: "
                                                  "pixels (data2vec takes none: its targets are the teacher's)")
    mask_ratio: float | None = opt(None, "fraction of patches masked; None: 0.75 for mae, 0.6 for simmim/data2vec")
    mask_type: Literal["random", "block"] | None = opt(None, "random (MAE) or block (BEiT-style) masking; None: "
                                                       "random for mae, block for simmim/data2vec")
    mask_min_block: int = opt(16, "block masks: smallest block, in patches (BEiT: 16; at most a quarter of the grid)")
    mask_max_block: int | None = opt(None, "block masks: largest block, in patches (None: the remaining budget)")
    norm_pix_loss: bool = opt(False, "regress per-patch normalised pixels (the published recipe; reconstructions "
                                     "then look flat)")
    in_chans: int | None = opt(None, "image channels (1 grayscale, 3 RGB, N multispectral); None: dataset.json's "
                                     "channels, else 3")
    init_from: str | None = opt(None, "continued pretraining: start from these weights (a run dir, mae/encoder."
                                      "safetensors, a ZeRO-3 consolidation, an official .pth, an HF ViTMAE dir, timm "
                                      "weights) with a fresh optimizer and schedule")
    layer_norm_eps: float | None = opt(None, "LayerNorm epsilon of every norm; None: 1e-6 (MAE's; HF ViTMAE configs "
                                       "often say 1e-12)")
    overrides: dict[str, Any] = opt({}, "extra constructor arguments of the variant, e.g. model.overrides.depth=2")
    pool: Literal["token", "avg"] = opt("token", POOL_HELP)

    def __post_init__(self) -> None:
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_min_block < 1 or (self.mask_max_block is not None and self.mask_max_block < self.mask_min_block):
            raise ValueError("mask_min_block must be >= 1 and mask_max_block (when set) >= mask_min_block")
        if self.img_size < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        # command-line values arrive as text: read them the way YAML would (`depth=2` -> 2, `qkv_bias=false` -> False)
        self.overrides = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in self.overrides.items()}
        clash = {"img_size", "mask_ratio", "mask_type", "norm_pix_loss", "target", "mask_min_block",
                 "mask_max_block"} & set(self.overrides)
        if clash:
            raise ValueError(f"set {sorted(clash)} as model.<key>, not model.overrides.<key>")
        check_objective(self.objective, self.target, self.norm_pix_loss, self.overrides)
        if (why := pretraining_refusal(self.name)) is not None:  # a conv stem: masking is not defined (hybrid.py)
            raise ValueError(why)
        from models.variants import MAE_VARIANTS, unknown_variant

        if self.name not in MAE_VARIANTS:  # a typo: refused here, naming the closest variant, not when building
            raise ValueError(unknown_variant(self.name))

    def resolved(self) -> ModelConfig:
        """A copy with the objective's defaults filled in (target, mask type and ratio); what the run records."""
        mask_type, mask_ratio = DEFAULT_MASKING[self.objective]
        return replace(self, target=self.target or default_target(self.objective),
                       mask_type=self.mask_type or mask_type,
                       mask_ratio=mask_ratio if self.mask_ratio is None else self.mask_ratio)


@dataclass
class DataConfig:
    train: str = opt("data/sample", TRAIN_HELP)
    micro_batch: int | None = opt(64, MICRO_HELP)
    global_batch: int | None = opt(None, GLOBAL_HELP)
    num_workers: int = opt(2, "loader worker processes per rank")
    mean: tuple[float, ...] | None = opt(None, NORM_HELP.format("mean"))
    std: tuple[float, ...] | None = opt(None, NORM_HELP.format("std"))
    shuffle_buffer: int | None = opt(None, "sample shuffle buffer per worker; None: the loader's default")
    augment: Literal["crop", "none"] = opt("crop", "pretraining augmentation: crop (RandomResizedCrop over "
                                           "crop_scale + flip) or none (the eval transform: resize, center crop)")
    crop_scale: tuple[float, float] = opt((0.2, 1.0), "RandomResizedCrop area range, fractions of the image (MAE: "
                                          "0.2-1)")
    hflip: float = opt(0.5, "horizontal flip probability of the crop augmentation")
    loader: Literal["stream", "device", "synthetic"] = opt(
        "stream", "stream: WebDataset shards through loader workers; device: a small dataset (CIFAR-scale) held on "
                  "the device as uint8, cropped there; synthetic: random uint8 images of the configured shape, no I/O "
                  "(timing the step alone)")
    pin_memory: bool | None = opt(None, "pinned host memory for the batches; None: on with CUDA")
    prefetch: int = opt(1, PREFETCH_HELP)
    eval_batch: int = opt(250, EVAL_BATCH_HELP)
    log_samples: bool = opt(False, LOG_SAMPLES_HELP)

    EXCLUSIVE = (("micro_batch", "global_batch"),)

    def __post_init__(self) -> None:
        check_batch_keys(self.micro_batch, self.global_batch)
        if self.eval_batch < 1:
            raise ValueError(f"eval_batch must be >= 1, got {self.eval_batch}")
        if self.num_workers < 0 or self.prefetch < 0:
            raise ValueError(f"num_workers and prefetch must be >= 0, got {self.num_workers}, {self.prefetch}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0 or not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1 (got {self.crop_scale}) and hflip be in "
                             f"[0, 1] (got {self.hflip})")


@dataclass
class VisConfig:
    images: str | None = opt(None, "images of the reconstruction grid (RUN_DIR/reconstructions/step_XXXXXX.png at "
                                   "each evaluation, reconstructions.png at the end); None: the val/test split next "
                                   "to data.train, else data.train")
    num_images: int = opt(8, "images in the reconstruction grid (fixed: the first N of vis.images; 0: no grid)")
    seed: int = opt(0, "seed of the grid's masks (same masks at every step)")

    def __post_init__(self) -> None:
        if self.num_images < 0:
            raise ValueError("vis.num_images must be >= 0")


@dataclass
class KnnConfig:
    enabled: bool = opt(True, "k-NN monitor: knn_top1 of the encoder's features at every evaluation (run.eval_every) "
                              "and at the end (off by itself when no labels exist)")
    bank: str | None = opt(None, "labelled split whose features vote (folder:split); None: data.train")
    query: str | None = opt(None, "labelled split to classify; None: the val/test split next to data.train")
    bank_size: int | None = opt(1000, "bank images (a fixed subset: the first of every shard); None: the whole split")
    query_size: int | None = opt(500, "query images (fixed subset, as bank_size); None: the whole split")
    k: int = opt(20, "neighbours that vote")
    temperature: float = opt(0.07, "vote weight exp(cosine / T) (DINO's k-NN evaluation)")

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError("knn.k must be >= 1 and knn.temperature > 0")
        if any(n is not None and n < 1 for n in (self.bank_size, self.query_size)):
            raise ValueError("knn.bank_size and knn.query_size must be >= 1 (or None: the whole split)")


@dataclass
class HogConfig:
    cell: int | None = opt(None, "HOG cell size in pixels; None: half the patch (2x2 cells per patch, as MaskFeat)")
    bins: int = opt(9, "orientation bins over 0-180 degrees")

    def __post_init__(self) -> None:
        if (self.cell is not None and self.cell < 1) or self.bins < 1:
            raise ValueError("hog.cell and hog.bins must be >= 1")


@dataclass
class Data2VecConfig:
    ema_decay: float = opt(0.999, "teacher momentum at the start (data2vec: 0.999)")
    ema_end_decay: float = opt(0.9999, "teacher momentum at the end of the run (data2vec: 0.9999)")
    ema_schedule: Literal["linear", "cosine"] = opt("linear", "momentum from ema_decay to ema_end_decay over run.steps")
    top_k: int = opt(6, "average the teacher's last K block outputs (data2vec ViT-B: 6 of 12)")
    loss_beta: float = opt(2.0, "Smooth L1 beta of the regression loss; 0: MSE (data2vec vision: 2)")

    def __post_init__(self) -> None:
        if not (0.0 <= self.ema_decay <= 1.0 and 0.0 <= self.ema_end_decay <= 1.0):
            raise ValueError("data2vec.ema_decay and data2vec.ema_end_decay must be in [0, 1]")
        if self.top_k < 1 or self.loss_beta < 0:
            raise ValueError("data2vec.top_k must be >= 1 and data2vec.loss_beta >= 0")


@dataclass
class PretrainConfig:
    model: ModelConfig = section(ModelConfig, "the masked autoencoder")
    data: DataConfig = section(DataConfig, "training data and loader")
    # blr 1e-3 (the official MAE script's default) so the small default run visibly learns; the ImageNet recipes set
    # the published 1.5e-4. The default run (240 steps of 64 images, ~4 passes over the 4000-image sample) takes a few
    # minutes on a 2-core CPU.
    optim: OptimConfig = section(OptimConfig, "AdamW and the lr schedule", blr=1e-3)
    run: RunConfig = section(RunConfig, "run directory, length, precision, logging, evaluation, checkpoints",
                             output_dir="runs/pretrain", steps=240, save_every=120, eval_every=120)
    vis: VisConfig = section(VisConfig, "reconstruction pictures")
    hog: HogConfig = section(HogConfig, "HOG targets (model.target=hog)")
    data2vec: Data2VecConfig = section(Data2VecConfig, "the data2vec teacher and loss (model.objective=data2vec)")
    knn: KnnConfig = section(KnnConfig, "live k-NN monitor (knn_top1 in metrics.jsonl)")

    RENAMED = {"data.recon": "vis.images", "knn.every": "run.eval_every", "vis.every": "run.eval_every",
               "knn.pool": "model.pool", "knn.batch_size": "data.eval_batch"}

    def __post_init__(self) -> None:
        if self.optim.name != "adamw":
            raise ValueError(f"optim.name={self.optim.name}: pretraining uses AdamW (optim.name=adamw)")

    def inapplicable(self) -> dict[str, str]:
        """Keys that have no effect on this run, given the others (refused when given)."""
        m, d, out = self.model, self.data, {}
        if m.objective != "data2vec":
            out.update({f"data2vec.{k}": f"model.objective={m.objective} has no EMA teacher" for k in
                        ("ema_decay", "ema_end_decay", "ema_schedule", "top_k", "loss_beta")})
        if (m.target or "pixels") != "hog":
            out.update({f"hog.{k}": "the targets are not HOG (model.target=hog)" for k in ("cell", "bins")})
        if d.augment == "none":
            out.update({f"data.{k}": "data.augment=none" for k in ("crop_scale", "hflip")})
        if d.loader != "stream":
            out.update({f"data.{k}": f"data.loader={d.loader} reads no shards through workers"
                        for k in ("shuffle_buffer", "pin_memory")})
        if not self.knn.enabled:
            out.update({f"knn.{k}": "knn.enabled=false" for k in ("bank", "query", "bank_size", "query_size", "k",
                                                                  "temperature")})
        if m.mask_type == "random" or (m.mask_type is None and m.objective == "mae"):
            out.update({f"model.{k}": "random masks have no blocks (model.mask_type=block)"
                        for k in ("mask_min_block", "mask_max_block")})
        return out


__all__ = ["PretrainConfig", "ModelConfig", "DataConfig", "VisConfig", "KnnConfig", "HogConfig", "Data2VecConfig"]
