"""lr schedule: linear warmup + half-cycle cosine, checked against hand-worked values; apply_lr honours lr_scale."""

import math

import pytest
import torch

from launch.schedule import apply_lr, lr_at


def test_warmup_is_linear_from_zero():
    # peak 1.0, 4 warmup steps: 0, 1/4, 2/4, 3/4, then the peak at step 4
    got = [lr_at(s, peak_lr=1.0, warmup_steps=4, total_steps=14) for s in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_cosine_hand_values():
    kw = dict(peak_lr=2.0, warmup_steps=4, total_steps=14, min_lr=0.5)
    # decay over 10 steps: at step 4+5 (halfway) cos(pi/2)=0 -> min + (peak-min)/2 = 1.25
    assert lr_at(9, **kw) == pytest.approx(1.25)
    # a quarter of the way: 0.5 + 1.5 * 0.5 * (1 + cos(pi/4))
    assert lr_at(6.5, **kw) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(14, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(0.5)  # past the end: stays at min_lr


def test_monotone_after_warmup_and_no_warmup():
    lrs = [lr_at(s, peak_lr=1e-3, warmup_steps=0, total_steps=50) for s in range(51)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15)


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, peak_lr=1.0, warmup_steps=1, total_steps=2)


def test_apply_lr_uses_group_scale():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    apply_lr(opt, 0.8)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.8])
