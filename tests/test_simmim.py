"""SimMIM: the encoder sees every patch, visible tokens are untouched by the mask token, the L1 loss counts masked
patches only (against a float64 hand computation), block masks by default, gradients reach the mask token."""

import pytest
import torch

from models.masking import block_mask_noise
from models.objectives import create_pretrainer
from models.simmim import SimMIM

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)


def tiny(**kw):
    torch.manual_seed(0)
    return SimMIM(**{**TINY, **kw})


def test_visible_tokens_untouched_and_masked_ones_are_the_token():
    m = tiny().eval()
    imgs = torch.randn(2, 3, 16, 16)
    mask = m.make_mask(imgs, noise=torch.rand(2, 16))
    tokens = m.embed(imgs, mask)  # [N, 1+L, D] entering the first block
    enc = m.encoder
    plain = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]  # what a visible patch must get, by hand
    masked = (m.mask_token + enc.pos_embed[:, 1:]).expand(2, -1, -1)
    vis = mask == 0
    assert vis.any() and (~vis).any()
    assert torch.equal(tokens[:, 1:][vis], plain[vis])  # exactly: the mask token does not leak into visible tokens
    torch.testing.assert_close(tokens[:, 1:][~vis], masked[~vis], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, :1], (enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1))
    # the token sits under the position embedding (SimMIM), so masked positions still differ from one another
    assert not torch.allclose(tokens[0, 1:][~vis[0]][0], tokens[0, 1:][~vis[0]][1])


def test_encoder_sees_every_patch_and_equals_timm_without_mask():
    m = tiny().eval()
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    imgs = torch.randn(2, 3, 16, 16)
    m(imgs)
    assert seen == [torch.Size([2, 1 + 16, 32])]
    torch.testing.assert_close(m.encode(imgs, None), m.encoder.forward_features(imgs), rtol=0, atol=0)
    torch.testing.assert_close(m.encode(imgs, torch.zeros(2, 16)), m.encoder.forward_features(imgs))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_l1_loss_on_masked_patches_only_against_hand_computation(norm_pix):
    m = tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 16, 16)
    loss, pred, mask = m(imgs, noise=torch.rand(2, 16))
    total, count = 0.0, 0
    for n in range(2):
        for i in range(16):
            if mask[n, i] != 1:
                continue
            h, w = divmod(i, 4)
            t = imgs[n, :, h * 4:(h + 1) * 4, w * 4:(w + 1) * 4].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total += (pred[n, i].double() - t).abs().mean().item()
            count += 1
    assert count == 2 * (16 - int(16 * 0.4))  # ratio 0.6: 10 of 16 patches masked
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    changed = pred.detach().clone()
    changed[mask == 0] += 100.0  # predictions at visible patches do not count
    assert m.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[mask == 1] += 1.0
    assert m.forward_loss(imgs, changed, mask).item() != pytest.approx(loss.item(), rel=1e-3)


def test_block_masks_by_default_from_masking_module():
    m = create_pretrainer("simmim", "mae_vit_tiny_patch4_dec128d2b", depth=1)  # 32 px, 8x8 patches
    assert (m.mask_type, m.mask_ratio) == ("block", 0.6)
    noise = m.make_noise(3, generator=torch.Generator().manual_seed(5))
    ref = block_mask_noise(3, 8, 8, 0.6, generator=torch.Generator().manual_seed(5), min_block=16)
    assert torch.equal(noise, ref)
    mask = m.make_mask(torch.zeros(3, 3, 32, 32), noise=noise)
    assert torch.equal(mask.sum(1), torch.full((3,), float(64 - int(64 * 0.4))))
    assert torch.equal(mask.bool(), noise >= noise.sort(1).values[:, int(64 * 0.4)].unsqueeze(1))  # largest masked
    # block sizes are configurable and reach the generator
    small = create_pretrainer("simmim", "mae_vit_tiny_patch4_dec128d2b", depth=1, mask_min_block=4, mask_max_block=6)
    ref = block_mask_noise(3, 8, 8, 0.6, generator=torch.Generator().manual_seed(5), min_block=4, max_block=6)
    assert torch.equal(small.make_noise(3, generator=torch.Generator().manual_seed(5)), ref)


def test_gradients_reach_mask_token_and_head_not_pos_embed():
    m = tiny()
    loss, _, _ = m(torch.randn(2, 3, 16, 16))
    loss.backward()
    assert m.encoder.pos_embed.grad is None
    assert m.mask_token.grad.abs().sum() > 0 and m.head.weight.grad.abs().sum() > 0
    assert m.encoder.cls_token.grad.abs().sum() > 0
    assert set(k for k in m.state_dict() if not k.startswith("encoder.")) == {"mask_token", "head.weight", "head.bias"}
