"""Typed config of `pretrain/mae.py`: model, data, optimiser, run, and reconstruction pictures.

The dataclass defaults ARE the default run: a small MAE on the shipped CIFAR-10 sample (`data/sample`) that
finishes in a few minutes on a laptop CPU. YAML files under `pretrain/configs/` hold only differences from these
defaults; `key=value` overrides come last (`launch.config.load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml

from launch.config import opt, section
from launch.sections import OptimConfig, RunConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    name: str = opt("mae_vit_tiny_patch4_dec128d2b", "MAE variant (models.variants.MAE_VARIANTS), e.g. mae_vit_base_patch16_dec512d8b")
    img_size: int = opt(32, "input resolution (pixels, square)")
    mask_ratio: float = opt(0.75, "fraction of patches removed")
    mask_type: Literal["random", "block"] = opt("random", "random (MAE) or block (BEiT-style) masking")
    norm_pix_loss: bool = opt(False, "regress per-patch normalised pixels (the published recipe; reconstructions then look flat)")
    overrides: dict[str, Any] = opt({}, "extra constructor arguments of the variant, e.g. model.overrides.depth=2")

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.img_size < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        # command-line values arrive as text: read them the way YAML would (`depth=2` -> 2, `qkv_bias=false` -> False)
        self.overrides = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in self.overrides.items()}
        clash = {"img_size", "mask_ratio", "mask_type", "norm_pix_loss"} & set(self.overrides)
        if clash:
            raise ValueError(f"set {sorted(clash)} as model.<key>, not model.overrides.<key>")


@dataclass
class DataConfig:
    train: str = opt("data/sample", "training data: folder with dataset.json (folder:split), shard pattern or URLs")
    recon: str | None = opt(None, "images for the reconstruction grid; None: the val/test split next to train, else train")
    batch_size: int = opt(64, "images per process per micro-step (global batch = this x processes x grad_accum_steps)")
    num_workers: int = opt(2, "loader worker processes per rank")
    mean: tuple[float, float, float] = opt(IMAGENET_MEAN, "normalisation mean (RGB)")
    std: tuple[float, float, float] = opt(IMAGENET_STD, "normalisation std (RGB)")
    shuffle_buffer: int | None = opt(None, "sample shuffle buffer per worker; None: the loader's default")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class VisConfig:
    every: int = opt(80, "write RUN_DIR/reconstructions/step_XXXXXX.png every N steps (0: only at the end)")
    num_images: int = opt(8, "images in the reconstruction grid (fixed: the first N of the recon split)")
    seed: int = opt(0, "seed of the grid's masks (same masks at every step)")

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_images < 0:
            raise ValueError("vis.every and vis.num_images must be >= 0")


@dataclass
class PretrainRunConfig(RunConfig):
    """`RunConfig` with the pretraining defaults (a subclass, so overrides keep the other defaults): the default run
    (240 steps of 64 images, ~4 passes over the 4000-image sample) takes about 3 minutes on a 2-core CPU."""

    output_dir: str = opt("runs/pretrain", "run directory: config.yaml, metrics.jsonl, checkpoints/, exported weights")
    steps: int = opt(240, "number of optimizer steps (the loop counts optimizer steps, not micro-steps)")
    save_every: int = opt(120, "save a resumable checkpoint every N steps (0: only at the end)")


@dataclass
class PretrainOptimConfig(OptimConfig):
    """`OptimConfig` with blr 1e-3 (the official MAE script's default) so the small default run visibly learns;
    the ImageNet recipes set the published 1.5e-4."""

    blr: float = opt(1e-3, "base learning rate; lr = blr * global_batch / 256 unless lr is set")


@dataclass
class PretrainConfig:
    model: ModelConfig = section(ModelConfig, "the masked autoencoder")
    data: DataConfig = section(DataConfig, "training data and loader")
    optim: PretrainOptimConfig = section(PretrainOptimConfig, "AdamW and the lr schedule")
    run: PretrainRunConfig = section(PretrainRunConfig, "run directory, length, precision, logging, checkpoints")
    vis: VisConfig = section(VisConfig, "reconstruction pictures")


__all__ = ["PretrainConfig", "PretrainRunConfig", "PretrainOptimConfig", "ModelConfig", "DataConfig", "VisConfig"]
