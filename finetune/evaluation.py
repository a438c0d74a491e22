"""Evaluation of a classifier over a split: top-k accuracy over exactly the split's images, and eval.json.

The eval loader pads ranks to equal batch counts and marks real samples with `valid`; only those are counted and the
hits are summed across ranks, so `n_images` equals the split size whatever the number of processes.
`evaluate_model` runs one pass; `write_eval_json` writes the result on the main process, atomically.
`ClassifierEval` is the one evaluation path of the classification-style runs (fine-tuning and probing): during the
run, at the end, the best top-1 and its weights, eval.json and the run record's final metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.errors import ConfigError
from launch import run_files
from launch.loop import Hook
from launch.metrics import json_safe
from launch.signals import signals_deferred


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Per-sample hits `[N, len(ks)]` (bool): is the label among the k highest logits? (k capped at the classes)"""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top.eq(labels[:, None])  # [N, kmax]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1) for k in ks], dim=1)  # [N, len(ks)]


class AccuracyMeter:
    """Accumulates top-1/top-5 hits and the image count of valid samples; `compute` sums over ranks."""

    def __init__(self, ks: tuple[int, ...] = (1, 5), device: torch.device | str = "cpu") -> None:
        self.ks = ks
        self.sums = torch.zeros(len(ks) + 1, dtype=torch.float64, device=device)  # hits per k, then count
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.corrupt = torch.zeros((), dtype=torch.float64, device=device)  # images of the split that did not decode

    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
               loss_per_sample: torch.Tensor | None = None, corrupt: torch.Tensor | None = None) -> None:
        if corrupt is not None:  # the eval stream's per-entry mask of unreadable images
            self.corrupt += corrupt.to(self.corrupt.device).double().sum()
        if valid is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        valid = valid.to(torch.bool)
        if bool((labels[valid] < 0).any()):
            raise ConfigError("the evaluated split has unlabelled images (label -1); evaluation needs labels")
        logits, labels = logits[valid].float(), labels[valid]
        hits = topk_correct(logits, labels, self.ks).to(self.sums.dtype)  # [n, len(ks)]
        self.sums[:-1] += hits.sum(0).to(self.sums.device)
        self.sums[-1] += labels.numel()
        if loss_per_sample is not None:
            self.loss_sum += loss_per_sample[valid].double().sum().to(self.sums.device)

    def compute(self, accelerator=None) -> dict:
        """`{"top1": %, "top5": %, "n_images": int, "loss": mean CE, "n_corrupt": int}` over all ranks (reduce-sum
        when distributed); `n_images + n_corrupt` is the split's size."""
        both = torch.cat([self.sums, self.corrupt[None], self.loss_sum[None]])
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(both.to(accelerator.device), reduction="sum")
        both = both.cpu()
        n = int(round(both[len(self.ks)].item()))
        out = {f"top{k}": (100.0 * both[i].item() / n if n else 0.0) for i, k in enumerate(self.ks)}
        out["n_images"] = n
        out["n_corrupt"] = int(round(both[len(self.ks) + 1].item()))
        out["loss"] = both[-1].item() / n if n else None
        return out


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches, accelerator, *, total: int | None = None, progress: bool = True,
                   desc: str = "eval") -> dict:
    """`{"top1", "top5", "n_images", "loss"}` of `model` (logits from `model(images)`) over `batches`, device batches
    of the eval stream (`data.device_input.device_batches`): "image", "label", "valid"."""
    was_training = model.training
    model.eval()
    meter = AccuracyMeter(device=accelerator.device)
    show = progress and accelerator.is_main_process
    for batch in tqdm(batches, desc=desc, disable=not show, total=total, leave=False):
        with accelerator.autocast():
            logits = model(batch["image"])
        logits = logits.float()
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        meter.update(logits, labels, batch.get("valid"), loss, batch.get("corrupt"))
    model.train(was_training)
    return meter.compute(accelerator)


def write_eval_json(path: str | Path, result: dict, accelerator=None) -> None:
    if accelerator is not None and not accelerator.is_main_process:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")  # strict JSON: NaN is null
    os.replace(tmp, path)


class ClassifierEval:
    """Every `run.eval_every` steps: `evaluate()` on the test split, logged as test_top1/test_top5/test_loss; a new
    best top-1 (kept across restarts by the session) saves `classifier_best.safetensors` through `save_weights(name,
    step)`. `finish(step, summary)`: the final evaluation, `classifier_last` (and `classifier_best` when none is
    better), eval.json with the summary, one line, and the session's end."""

    def __init__(self, session, evaluate, save_weights, name: str):
        self.session, self.evaluate, self.save_weights, self.name = session, evaluate, save_weights, name
        session.keep("best_top1", -1.0)

    @property
    def best(self) -> float:
        return float(self.session.values["best_top1"])

    def hook(self) -> Hook:
        return Hook(self.session.cfg.run.eval_every, self._during)

    def _during(self, step: int) -> dict | None:
        if step >= self.session.cfg.run.steps:  # the final evaluation follows the loop
            return None
        r = self.evaluate()
        if r["top1"] > self.best:
            self.session.values["best_top1"] = r["top1"]
            self.save_weights(run_files.CLASSIFIER_BEST, step)
        return {"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]}

    def finish(self, step: int, summary: dict) -> dict:
        """A stop signal meanwhile waits for the final evaluation and export (every file is written atomically)."""
        with signals_deferred(self.session.rt.say):
            return self._finish(step, summary)

    def _finish(self, step: int, summary: dict) -> dict:
        session = self.session
        r = self.evaluate()
        session.log(step, {"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]})
        self.save_weights(run_files.CLASSIFIER_LAST, step)
        if r["top1"] > self.best or not (session.run_dir / run_files.CLASSIFIER_BEST).exists():
            session.values["best_top1"] = max(self.best, r["top1"])
            self.save_weights(run_files.CLASSIFIER_BEST, step)
        out = {"top1": r["top1"], "top5": r["top5"], "n_images": r["n_images"], "n_corrupt": r["n_corrupt"],
               "loss": r["loss"], "best_top1": self.best, "steps": step, **summary}
        if "ema" in r:
            out["ema"] = r["ema"]
        write_eval_json(session.run_dir / run_files.EVAL, out, session.rt.accelerator)
        session.rt.say(f"[{self.name}] {step} steps: top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  on {r['n_images']} "
                       f"images (best {self.best:.2f}) -> {session.run_dir / run_files.EVAL}")
        session.rt.accelerator.wait_for_everyone()
        session.finish(step, {k: out[k] for k in ("top1", "top5", "n_images", "loss", "best_top1")})
        return out


__all__ = ["topk_correct", "AccuracyMeter", "evaluate_model", "write_eval_json", "ClassifierEval"]
