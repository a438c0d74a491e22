"""data2vec: the teacher is exactly the EMA of the student (float64 reference) and receives no gradient; its targets
(top-K block outputs, instance-normed, averaged, layer-normed) and the masked Smooth L1 / MSE loss against float64
hand computations; the momentum schedule."""

import copy
import math

import pytest
import torch

from models.data2vec import Data2VecStudent, EmaTeacher, ema_decay_at

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2)


def pair(top_k=2, **kw):
    torch.manual_seed(0)
    student = Data2VecStudent(**TINY)
    return student, EmaTeacher(student.encoder, top_k=top_k, total_steps=10, **kw)


def f64(module):
    return {k: v.detach().double().clone() for k, v in module.state_dict().items()}


def train_step(student, teacher, opt):
    imgs = torch.randn(2, 3, 16, 16)
    loss, _, _ = student(imgs, teacher.targets(imgs))
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_teacher_is_exactly_the_ema_of_the_student():
    student, teacher = pair(decay=0.9, end_decay=0.99)
    t = f64(teacher.encoder)
    assert all(torch.equal(t[k], v) for k, v in f64(student.encoder).items())  # starts as a copy
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in (1, 2, 3):
        train_step(student, teacher, opt)
        d = teacher.update(student.encoder, step)
        assert d == pytest.approx(0.9 + (0.99 - 0.9) * step / 10)  # linear schedule over total_steps=10
        s = f64(student.encoder)
        t = {k: d * t[k] + (1 - d) * s[k] for k in t}  # float64 reference of the running average
        got = f64(teacher.encoder)
        for k in t:
            torch.testing.assert_close(got[k], t[k], rtol=0, atol=2e-7, msg=k)
    moved = got["blocks.0.attn.qkv.weight"] - s["blocks.0.attn.qkv.weight"]
    assert moved.abs().max() > 1e-4  # the teacher lags the student: not a copy


def test_teacher_receives_no_gradient_and_is_not_a_student_parameter():
    student, teacher = pair()
    imgs = torch.randn(2, 3, 16, 16)
    targets = teacher.targets(imgs)
    assert not targets.requires_grad
    loss, _, _ = student(imgs, targets)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and student.mask_token.grad.abs().sum() > 0
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    assert set(k for k in student.state_dict() if not k.startswith("encoder.")) == {"mask_token", "head.weight",
                                                                                   "head.bias"}


def test_targets_match_float64_hand_computation():
    _, teacher = pair(top_k=2)
    with torch.no_grad():  # make the blocks differ from their init so the layers are not alike
        for p in teacher.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(2, 3, 16, 16)
    ref_enc = copy.deepcopy(teacher.encoder).double()  # the same weights, run in float64
    x = ref_enc._pos_embed(ref_enc.patch_embed(imgs.double()))
    outs = []
    for blk in ref_enc.blocks:
        x = blk(x)
        outs.append(x[:, 1:])  # patch tokens [N, L, D]
    normed = []
    for y in outs[-2:]:  # instance norm: each channel over the tokens of one image, biased variance, eps 1e-5
        mu = y.mean(dim=1, keepdim=True)
        var = ((y - mu) ** 2).mean(dim=1, keepdim=True)
        normed.append((y - mu) / torch.sqrt(var + 1e-5))
    avg = (normed[0] + normed[1]) / 2
    mu = avg.mean(dim=-1, keepdim=True)  # layer norm over channels, no affine
    ref = (avg - mu) / torch.sqrt(((avg - mu) ** 2).mean(dim=-1, keepdim=True) + 1e-5)
    got = teacher.targets(imgs)
    assert got.shape == (2, 16, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [2.0, 0.5, 0.0])
def test_loss_on_masked_tokens_against_hand_computation(beta):
    torch.manual_seed(0)
    student = Data2VecStudent(**TINY, loss_beta=beta)
    imgs, targets = torch.randn(2, 3, 16, 16), 2 * torch.randn(2, 16, 32)
    loss, pred, mask = student(imgs, targets, noise=torch.rand(2, 16))
    total, count = 0.0, 0
    for n in range(2):
        for i in range(16):
            if mask[n, i] != 1:
                continue
            d = (pred[n, i].double() - targets[n, i].double()).abs()
            per = d ** 2 if beta == 0 else torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta)
            total += per.sum().item() / math.sqrt(32)
            count += 1
    assert count == 20 and loss.item() == pytest.approx(total / count, rel=1e-5)
    changed = targets.clone()
    changed[mask == 0] += 100.0  # targets at visible positions do not count
    assert student.forward_loss(pred, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_momentum_schedules():
    for step, lin in [(0, 0.999), (50, 0.99945), (100, 0.9999), (150, 0.9999)]:
        assert ema_decay_at(step, 100, 0.999, 0.9999, "linear") == pytest.approx(lin)
    assert ema_decay_at(50, 100, 0.999, 0.9999, "cosine") == pytest.approx(0.99945)
    assert ema_decay_at(25, 100, 0.999, 0.9999, "cosine") == pytest.approx(0.9999 - 0.0009 * (1 + 2 ** -0.5) / 2)
    with pytest.raises(ValueError, match="schedule"):
        ema_decay_at(1, 10, schedule="step")
    with pytest.raises(ValueError, match="top_k"):
        pair(top_k=4)
