"""MaskedAutoencoder: patch layout, loss on masked patches only, norm-pix targets, init, encoder token count."""

import pytest
import torch
import torch.nn as nn

from models.mae import MaskedAutoencoder

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoder(**{**TINY, **kw})


def test_patchify_layout_and_roundtrip():
    m = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    x = m.patchify(imgs)
    assert x.shape == (2, 16, 48)
    # hand-written layout: patch (h, w) in row-major order, vector ordered (p, q, c)
    for h, w, p, q, c in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 2), (3, 3, 2, 0, 1)]:
        assert x[1, h * 4 + w, (p * 4 + q) * 3 + c] == imgs[1, c, h * 4 + p, w * 4 + q]
    assert torch.equal(m.unpatchify(x), imgs)


def test_forward_shapes_and_determinism():
    m = tiny().eval()
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    loss, pred, mask = m(imgs, noise=noise)
    assert pred.shape == (3, 16, 48) and mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))  # int(16 * 0.25) = 4 kept
    loss2, pred2, mask2 = m(imgs, noise=noise)
    assert torch.equal(loss, loss2) and torch.equal(pred, pred2) and torch.equal(mask, mask2)
    _, _, mask3 = m(imgs, mask_ratio=0.5, noise=noise)
    assert mask3.sum().item() == 3 * 8


def test_encoder_sees_only_visible_patches_plus_cls():
    m = tiny()
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    m(torch.randn(2, 3, 16, 16), mask_ratio=0.75)
    assert seen == [torch.Size([2, 1 + 4, 32])]


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_float64_reference_and_ignores_visible(norm_pix):
    m = tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = m(imgs, noise=noise)
    # independent float64 computation with an explicit loop over patches
    total, count = 0.0, 0
    for n in range(2):
        for i in range(16):
            if mask[n, i] != 1:
                continue
            h, w = divmod(i, 4)
            t = imgs[n, :, h * 4:(h + 1) * 4, w * 4:(w + 1) * 4].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[n, i].double() - t) ** 2).mean().item()
            count += 1
    assert count == 24
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # predictions at visible positions do not matter
    changed = pred.detach().clone()
    changed[mask == 0] += 100.0
    assert m.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[mask == 1] += 1.0
    assert m.forward_loss(imgs, changed, mask).item() != pytest.approx(loss.item(), rel=1e-3)


def test_gradients_skip_fixed_pos_embeds_and_reach_tokens():
    m = tiny()
    loss, _, _ = m(torch.randn(2, 3, 16, 16))
    loss.backward()
    assert m.encoder.pos_embed.grad is None and m.decoder_pos_embed.grad is None
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    assert m.encoder.cls_token.grad.abs().sum() > 0


def test_official_init():
    m = MaskedAutoencoder(**{**TINY, "embed_dim": 64, "depth": 1, "decoder_embed_dim": 64})
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            bound = (6 / (mod.in_features + mod.out_features)) ** 0.5  # xavier_uniform
            assert mod.weight.abs().max() <= bound, name
            assert mod.weight.abs().max() > 0.8 * bound, name
            assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and torch.count_nonzero(mod.bias) == 0
            assert mod.eps == 1e-6
    w = m.encoder.patch_embed.proj.weight
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5  # xavier over the [D, C*p*p] view
    assert 0.8 * bound < w.abs().max() <= bound
    qkv = m.encoder.blocks[0].attn.qkv
    assert qkv.bias is not None  # qkv_bias
    both = torch.cat([m.encoder.cls_token.flatten(), m.mask_token.flatten()])
    assert 0.01 < both.std().item() < 0.03 and both.abs().max() > 0


def test_masked_predictions_differ_between_positions():
    # a zero/frozen decoder pos-embed (HF from-scratch bug) would give every masked patch the same prediction
    m = tiny()
    _, pred, mask = m(torch.randn(1, 3, 16, 16))
    masked = pred[0][mask[0] == 1]
    dist = torch.cdist(masked, masked) + torch.eye(len(masked)) * 1e9  # [M, M], diagonal excluded
    assert len(masked) == 12 and dist.min() > 1e-3


def test_block_mask_type_and_grayscale():
    m = tiny(mask_type="block", in_chans=1, mask_ratio=0.5)
    loss, pred, mask = m(torch.randn(2, 1, 16, 16))
    assert pred.shape == (2, 16, 16) and torch.equal(mask.sum(1), torch.full((2,), 8.0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="mask_type"):
        tiny(mask_type="grid")


def test_grad_checkpointing_gives_same_loss_and_grads():
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    a, b = tiny(), tiny()
    b.set_grad_checkpointing(True)
    la, _, _ = a(imgs, noise=noise)
    lb, _, _ = b(imgs, noise=noise)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    torch.testing.assert_close(a.encoder.blocks[0].attn.qkv.weight.grad, b.encoder.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(a.decoder_blocks[0].mlp.fc1.weight.grad, b.decoder_blocks[0].mlp.fc1.weight.grad)


def test_zero_mask_ratio_keeps_every_token_and_matches_timm_features():
    m = tiny().eval()
    imgs = torch.randn(2, 3, 16, 16)
    latent, mask, _ = m.forward_encoder(imgs, 0.0, noise=torch.arange(16.0).expand(2, -1))
    assert mask.sum() == 0
    # identity order (increasing noise): the encoder equals timm's own forward on the same weights
    torch.testing.assert_close(latent, m.encoder.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_loss_and_mask_in_float32():
    m = tiny(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    ref, _, _ = m(imgs, noise=noise)
    m16 = m.to(torch.bfloat16)  # as DeepSpeed bf16 does: model and inputs in bf16
    loss, pred, mask = m16(imgs.to(torch.bfloat16), noise=noise)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and mask.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
