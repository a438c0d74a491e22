"""Skip an optimizer update whose loss or gradients are not finite, deciding on the device (no host sync).

The decision `bad` is a 0-dim bool tensor, agreed by every rank (an all-reduce, asynchronous on NCCL). How the
update is skipped depends on the optimizer, because only some of torch's implementations can be told to skip:
* fused Adam/AdamW (CPU and CUDA) read a `found_inf` tensor, as GradScaler uses them: the kernel leaves weights and
  moments alone and the step counter is rolled back. We set that attribute.
* fp16 with a GradScaler: the scaler already finds inf/NaN gradients and skips; we leave it in charge.
* any other optimizer (foreach/single-tensor AdamW, timm's LARS, SGD): snapshot the parameters and optimizer state,
  step, and put the snapshot back where `bad` (`torch.where`, on the device). State created by a skipped first
  step is zeroed, which for momentum and Adam moments is the same as never having stepped. Costs one copy of the
  trained parameters and their state: cheap for a probe head, use fused AdamW for big models (the entry points do).
Buffers that the forward pass updates (BatchNorm running statistics and counters) are restored the same way in every
mode: `begin()` copies them before the step's forward, `step(bad)` puts them back where `bad`.
Written by hand: torch has the `found_inf` protocol only inside GradScaler and the fused kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind Accelerate's `AcceleratedOptimizer` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, whose kernels skip the update when `found_inf` is set."""
    inner = _inner(optimizer)
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


class NonFiniteGuard:
    """`step(bad)`: an optimizer step that leaves weights and state unchanged where `bad` (a device tensor) is true."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler=None, model: torch.nn.Module | None = None):
        self.optimizer = optimizer
        self.inner = _inner(optimizer)
        self.mode = "scaler" if scaler is not None else "found_inf" if honours_found_inf(optimizer) else "snapshot"
        self.buffers = list(model.buffers()) if model is not None else []
        self._saved_buffers: list[Tensor] = []

    def begin(self) -> None:
        """Call before the step's forward passes: keeps the buffers they may update."""
        self._saved_buffers = [b.detach().clone() for b in self.buffers]

    def step(self, bad: Tensor) -> None:
        if self._saved_buffers:
            with torch.no_grad():
                for b, old in zip(self.buffers, self._saved_buffers):
                    b.copy_(torch.where(bad, old, b))
            self._saved_buffers = []
        if self.mode == "scaler":  # GradScaler skips non-finite gradients itself (and lowers its scale)
            self.optimizer.step()
        elif self.mode == "found_inf":
            self.inner.found_inf = bad.float()  # [] float32, the fused kernels' skip flag
            self.optimizer.step()
            self.inner.found_inf = None
        else:
            self._snapshot_step(bad)

    def _snapshot_step(self, bad: Tensor) -> None:
        params = [p for g in self.inner.param_groups for p in g["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        state_before = {id(p): {k: v.detach().clone() for k, v in self.inner.state.get(p, {}).items()
                                if torch.is_tensor(v)} for p in params}
        self.optimizer.step()
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(torch.where(bad, old, p))
            for p in params:
                old_state = state_before[id(p)]
                for key, value in self.inner.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        old = old_state.get(key, torch.zeros_like(value))
                        value.copy_(torch.where(bad.to(value.device), old.to(value.dtype), value))


def nonfinite(*values: Tensor) -> Tensor:
    """0-dim bool tensor: any of `values` (on one device) holds a NaN or an infinity."""
    flags = [~torch.isfinite(v.detach()).all() for v in values]
    return torch.stack(flags).any()


__all__ = ["NonFiniteGuard", "honours_found_inf", "nonfinite"]
