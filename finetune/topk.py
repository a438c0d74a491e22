"""Top-k accuracy over exactly the valid samples of a split, summed across ranks.

The eval loader pads ranks to equal batch counts and marks real samples with `valid`; only those are counted, so
`n_images` equals the split size whatever the number of processes.
"""

from __future__ import annotations

import torch

from launch.config import ConfigError


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Per-sample hits `[N, len(ks)]` (bool): is the label among the k highest logits? k is capped at the class count."""
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

    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
               loss_per_sample: torch.Tensor | None = None) -> None:
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
        """`{"top1": %, "top5": %, "n_images": int, "loss": mean CE}` over all ranks (reduce-sum when distributed)."""
        both = torch.cat([self.sums, self.loss_sum[None]])
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(both.to(accelerator.device), reduction="sum")
        both = both.cpu()
        n = int(round(both[len(self.ks)].item()))
        out = {f"top{k}": (100.0 * both[i].item() / n if n else 0.0) for i, k in enumerate(self.ks)}
        out["n_images"] = n
        out["loss"] = both[-1].item() / n if n else float("nan")
        return out
