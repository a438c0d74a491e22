"""Config sections shared by the entry points: how a run runs (`RunConfig`), how it optimises (`OptimConfig`), and
the batch arithmetic every entry point shares (`resolve_batch`).

Entry points compose these with their own sections (model, data) in one top-level dataclass and give them their
own defaults with `section(RunConfig, ..., steps=240)`; see `pretrain/config.py` and `finetune/config.py`.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from typing import Literal

from launch.config import ConfigError, opt


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/, exported weights")
    seed: int = opt(0, "seed for model init, masking, data order and augmentation")
    steps: int = opt(300, "number of optimizer steps (the loop counts optimizer steps, not micro-steps)")
    precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "mixed precision; auto = bf16 on GPU, fp32 on CPU")
    log_every: int = opt(10, "log loss/lr/images-per-second to metrics.jsonl and trackers every N steps")
    eval_every: int = opt(0, "evaluate every N steps and at the end (0: only at the end): the k-NN monitor and the "
                             "reconstruction picture in pretraining, the test split in fine-tuning and probing")
    save_every: int = opt(100, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, "keep the last K checkpoints")
    resume: bool = opt(True, "resume from the latest checkpoint in output_dir when there is one")
    overwrite: bool = opt(False, "with resume=false: move the directory's old checkpoints aside and start over")
    trackers: tuple[str, ...] = opt(("tensorboard",), "Accelerate trackers: tensorboard, wandb, or none")
    wandb_project: str = opt("tessera", "W&B project name when trackers include wandb")
    max_nonfinite: int = opt(10, "stop after this many consecutive non-finite losses (each one skips its update)")
    compile: bool | None = opt(None, "torch.compile each transformer block; None: on with CUDA, off on CPU")
    progress: bool = opt(True, "show a progress bar on the main process (plain log lines when off)")

    def __post_init__(self) -> None:
        check_output_dir(self.output_dir)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every must be >= 0 and keep_checkpoints >= 1")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite}")
        unknown = set(self.trackers) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise ValueError(f"unknown trackers {sorted(unknown)}; use tensorboard, wandb or none")


def check_output_dir(output_dir) -> None:
    """Refuse a run directory that is empty (the run would land in the current directory) or that passes through a
    symlink loop (nothing could be written there); a ValueError naming `run.output_dir` and what to do."""
    if not str(output_dir).strip():
        raise ValueError("run.output_dir is empty, which would write the run into the current directory; name a "
                         "directory, e.g. run.output_dir=runs/my_run (run.output_dir=. for the current one)")
    try:
        os.stat(output_dir)
    except OSError as exc:  # a missing directory is fine (the run creates it); a loop is not
        if exc.errno == errno.ELOOP:
            raise ValueError(f"run.output_dir {output_dir} passes through a symlink loop ({exc.strerror}); remove the "
                             "loop or choose another run.output_dir") from None


def _positive_finite(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars"] = opt("adamw", "the optimizer: adamw (pretraining, fine-tuning, the attentive "
                                                  "probe) or lars (the linear probe)")
    blr: float = opt(1.5e-4, "base learning rate; lr = blr * global_batch / 256 unless lr is set")
    lr: float | None = opt(None, "absolute peak learning rate (overrides blr scaling)")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine")
    warmup_steps: int = opt(20, "linear warmup length in optimizer steps")
    weight_decay: float = opt(0.05, "AdamW weight decay (never on biases, norms, pos_embed, cls/mask tokens)")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    momentum: float = opt(0.9, "LARS momentum")
    trust_coeff: float = opt(1e-3, "LARS trust coefficient (adaptation on weights only, not biases, as MoCo v3/MAE)")
    grad_accum_steps: int = opt(1, "micro-steps per optimizer step (no gradient sync on the accumulation micro-steps)")
    clip_grad: float | None = opt(None, "clip the global gradient norm to this value (None: no clipping)")
    layer_decay: float | None = opt(None, "layer-wise lr decay (fine-tuning): block i gets decay**(depth+1-i)")

    def __post_init__(self) -> None:
        _positive_finite("blr", self.blr)
        _positive_finite("lr", self.lr)
        _positive_finite("min_lr", self.min_lr, allow_zero=True)
        _positive_finite("weight_decay", self.weight_decay, allow_zero=True)
        _positive_finite("eps", self.eps)
        _positive_finite("clip_grad", self.clip_grad)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        _positive_finite("trust_coeff", self.trust_coeff)

    def inapplicable(self) -> dict[str, str]:
        """The keys of the other optimizer (refused when given)."""
        if self.name == "lars":
            return dict.fromkeys(("betas", "eps", "layer_decay"), "AdamW settings; this run's optimizer is "
                                 "optim.name=lars (its settings: optim.momentum, optim.trust_coeff)")
        return dict.fromkeys(("momentum", "trust_coeff"), "LARS settings; this run's optimizer is optim.name=adamw")

    def peak_lr(self, global_batch: int) -> float:
        """The MAE scaling rule: `blr * global_batch / 256`, unless an absolute `lr` is given."""
        return self.lr if self.lr is not None else self.blr * global_batch / 256


TRAIN_HELP = ("training split: a folder with dataset.json (FOLDER:SPLIT, default split train), a shard pattern or "
              "URLs; a relative folder is found from the current directory, else from the repository")
TEST_HELP = "evaluated split (every image exactly once): FOLDER:SPLIT, a shard pattern or URLs"
POOL_HELP = "the encoder's feature: the CLS token after the final norm, or the mean of the patch tokens (avg)"
EVAL_BATCH_HELP = "images per process per forward of evaluation and feature extraction"
PREFETCH_HELP = "batches copied to the device ahead of the step (a side stream on CUDA)"
NORM_HELP = ("normalisation {} per channel; None: dataset.json's (written by data/make_shards.py), else ImageNet's "
             "for 3 channels, else 0.5")
MICRO_HELP = "images per process per micro-step (global_batch = micro_batch x processes x grad_accum_steps)"
LOG_SAMPLES_HELP = ("write each optimizer step's sample keys and global stream positions to RUN_DIR/samples.jsonl "
                    "(one gather per step; for comparing runs, e.g. across numbers of processes)")
GLOBAL_HELP = "images per optimizer step over all processes and accumulation micro-steps (the lr scaling batch)"


def resolve_batch(micro: int | None, global_: int | None, world: int, accum: int) -> tuple[int, int]:
    """(micro_batch, global_batch) from whichever of `data.micro_batch` / `data.global_batch` the config gives."""
    if (micro is None) == (global_ is None):
        raise ConfigError("give exactly one of data.micro_batch and data.global_batch")
    if micro is not None:
        return micro, micro * world * accum
    if global_ % (world * accum):
        raise ConfigError(f"data.global_batch={global_} is not divisible by processes ({world}) x "
                          f"optim.grad_accum_steps ({accum}); set data.micro_batch instead, or change it")
    return global_ // (world * accum), global_


def check_batch_keys(micro: int | None, global_: int | None) -> None:
    """`__post_init__` check of a data section holding both batch keys."""
    for name, value in (("micro_batch", micro), ("global_batch", global_)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if micro is None and global_ is None:
        raise ValueError("give one of micro_batch and global_batch")
