"""Config sections shared by the entry points: how a run runs (`RunConfig`) and how it optimises (`OptimConfig`).

Entry points compose these with their own sections (model, data) in one top-level dataclass; see
`pretrain/config.py` and `finetune/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launch.config import opt


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/, exported weights")
    seed: int = opt(0, "seed for model init, masking, data order and augmentation")
    steps: int = opt(300, "number of optimizer steps (the loop counts optimizer steps, not micro-steps)")
    precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "mixed precision; auto = bf16 on GPU, fp32 on CPU")
    log_every: int = opt(10, "log loss/lr/images-per-second to metrics.jsonl and trackers every N steps")
    save_every: int = opt(100, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, "keep the last K checkpoints")
    resume: bool = opt(True, "resume from the latest checkpoint in output_dir when there is one")
    trackers: tuple[str, ...] = opt(("tensorboard",), "Accelerate trackers: tensorboard, wandb, or none")
    wandb_project: str = opt("tessera", "W&B project name when trackers include wandb")
    max_nonfinite: int = opt(10, "stop after this many consecutive non-finite losses (each one skips its step)")
    compile: bool = opt(False, "torch.compile the model")
    progress: bool = opt(True, "show a progress bar on the main process")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every must be >= 0 and keep_checkpoints >= 1")
        unknown = set(self.trackers) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise ValueError(f"unknown trackers {sorted(unknown)}; use tensorboard, wandb or none")


@dataclass
class OptimConfig:
    blr: float = opt(1.5e-4, "base learning rate; lr = blr * global_batch / 256 unless lr is set")
    lr: float | None = opt(None, "absolute peak learning rate (overrides blr scaling)")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine")
    warmup_steps: int = opt(20, "linear warmup length in optimizer steps")
    weight_decay: float = opt(0.05, "AdamW weight decay (never on biases, norms, pos_embed, cls/mask tokens)")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_accum_steps: int = opt(1, "micro-steps per optimizer step (no gradient sync on the accumulation micro-steps)")
    clip_grad: float | None = opt(None, "clip the global gradient norm to this value (None: no clipping)")
    layer_decay: float | None = opt(None, "layer-wise lr decay (fine-tuning): block i gets decay**(depth+1-i)")

    def __post_init__(self) -> None:
        if self.blr <= 0 and self.lr is None:
            raise ValueError("blr must be > 0")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")

    def peak_lr(self, global_batch: int) -> float:
        """The MAE scaling rule: `blr * global_batch / 256`, unless an absolute `lr` is given."""
        return self.lr if self.lr is not None else self.blr * global_batch / 256
