"""Attention capture from timm's real forward pass (models/attention_maps.py): rows are distributions, the matrices
equal an independent float64 computation, capture does not change the output of the fused forward, a constructed
model puts the CLS attention on the chosen patch, and the rollout follows Abnar & Zuidema."""

import math

import pytest
import torch
from helpers_attention import force_cls_onto

from models.attention_maps import (
    AttentionRecorder,
    attention_rollout,
    capture_attention,
    cls_attention_maps,
    patch_grid,
    rollout_cls_map,
)
from models.vit import create_encoder

CFG = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _encoder(seed=0):
    torch.manual_seed(seed)
    return create_encoder(**CFG).eval()


def _images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_rows_sum_to_one_and_equal_float64_reference():
    vit = _encoder()
    x = _images()
    normed = {}
    hooks = [b.norm1.register_forward_hook(lambda m, i, o, k=k: normed.__setitem__(k, o.detach()))
             for k, b in enumerate(vit.blocks)]
    maps = capture_attention(vit, x)
    for h in hooks:
        h.remove()
    assert len(maps) == CFG["depth"]
    tokens = 1 + (32 // 8) ** 2
    heads, dh = CFG["num_heads"], CFG["embed_dim"] // CFG["num_heads"]
    for k, attn in enumerate(maps):
        assert attn.shape == (2, heads, tokens, tokens)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, tokens), atol=1e-5, rtol=0)
        # independent float64 computation from the block's own normalised input and qkv weights
        y = normed[k].double()  # [N, T, D]
        w = vit.blocks[k].attn.qkv.weight.double()
        b = vit.blocks[k].attn.qkv.bias.double()
        qkv = (y @ w.T + b).reshape(2, tokens, 3, heads, dh).permute(2, 0, 3, 1, 4)  # [3, N, H, T, dh]
        ref = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        torch.testing.assert_close(attn.double(), ref, atol=1e-5, rtol=1e-4)


def test_capture_keeps_the_fused_forward_output_and_restores_flags():
    vit = _encoder()
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    x = _images()
    with torch.no_grad():
        fused = vit.forward_features(x)
        with AttentionRecorder(vit) as rec:
            assert not any(b.attn.fused_attn for b in vit.blocks)
            captured = vit.forward_features(x)
    torch.testing.assert_close(captured, fused, atol=1e-5, rtol=1e-5)
    assert len(rec.maps) == CFG["depth"]
    assert all(b.attn.fused_attn for b in vit.blocks)
    assert all(len(b.attn.attn_drop._forward_hooks) == 0 for b in vit.blocks)
    # restored after an error too, and a module that was not fused stays not fused
    vit.blocks[0].attn.fused_attn = False
    with pytest.raises(RuntimeError):
        with AttentionRecorder(vit):
            vit.forward_features(torch.randn(1, 5, 32, 32))  # wrong channel count
    assert [b.attn.fused_attn for b in vit.blocks] == [False, True]
    assert all(len(b.attn.attn_drop._forward_hooks) == 0 for b in vit.blocks)


def test_capture_restores_training_mode():
    vit = _encoder().train()
    capture_attention(vit, _images(1))
    assert vit.training


def test_forced_attention_lands_on_the_chosen_patch():
    vit = _encoder()
    x = _images()
    rows, cols = patch_grid(vit, x)
    r, c = 2, 1  # row 2, column 1: not symmetric, so a transposed reshape would fail
    force_cls_onto(vit, x, r * cols + c)
    maps = capture_attention(vit, x)
    cls = cls_attention_maps(maps[-1], (rows, cols))  # [N, H, rows, cols]
    assert cls.shape == (2, CFG["num_heads"], rows, cols)
    assert (cls[0, :, r, c] > 0.999).all()
    flat = cls[0].flatten(1)  # [H, rows*cols]
    assert (flat.argmax(-1) == r * cols + c).all()
    # the earlier block was not touched: its CLS attention is spread out
    assert cls_attention_maps(maps[0], (rows, cols))[0].max() < 0.9


def test_rollout_matches_hand_computation():
    torch.manual_seed(0)
    a1 = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    a2 = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    eye = torch.eye(3, dtype=torch.float64)

    def step(a):
        m = a.double().mean(1)[0] + eye
        return m / m.sum(-1, keepdim=True)

    expected = step(a2) @ step(a1)
    got = attention_rollout([a1, a2])
    torch.testing.assert_close(got[0].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 3))
    # one layer of one-hot attention to token 2: half stays on the residual path, half goes to token 2
    onehot = torch.zeros(1, 1, 3, 3)
    onehot[..., 2] = 1.0
    torch.testing.assert_close(attention_rollout([onehot])[0, 0], torch.tensor([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([a1], head_fusion="median")


def test_rollout_on_a_real_model_is_a_distribution_on_the_grid():
    vit = _encoder()
    x = _images()
    maps = capture_attention(vit, x)
    grid = patch_grid(vit, x)
    cls_map = rollout_cls_map(attention_rollout(maps), grid)
    assert cls_map.shape == (2, *grid)
    assert (cls_map > 0).all() and (cls_map.flatten(1).sum(-1) < 1).all()  # the rest stays on the CLS token


def test_grid_mismatch_and_non_timm_attention_are_clear_errors():
    with pytest.raises(ValueError, match="does not fit"):
        cls_attention_maps(torch.ones(1, 1, 17, 17) / 17, (3, 3))
    with pytest.raises(TypeError, match="VisionTransformer"):
        AttentionRecorder(torch.nn.Linear(2, 2))
