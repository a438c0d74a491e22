"""Fine-tuning classifier: loads an MAE encoder, pools as MAE fine-tuning, resizes pos-embeds, names bad keys."""

import pytest
import torch
import torch.nn.functional as F

from models.classifier import create_classifier, load_encoder_into
from models.mae import MaskedAutoencoder
from models.state_check import CheckpointMismatch

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return MaskedAutoencoder(**TINY).eval()


def test_token_pool_reproduces_encoder_features(mae):
    clf = create_classifier(mae.encoder_cfg, num_classes=5).eval()
    report = load_encoder_into(clf, mae.state_dict())  # a full MAE state dict (encoder.* + decoder_*)
    assert report["missing"] == ["head.bias", "head.weight"] and report["resized"] is None
    imgs = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(clf.forward_features(imgs), mae.encoder.forward_features(imgs))
    assert clf(imgs).shape == (2, 5)


def test_avg_pool_drops_norm_and_uses_fc_norm(mae):
    clf = create_classifier(mae.encoder_cfg, num_classes=5, global_pool="avg", drop_path_rate=0.1).eval()
    report = load_encoder_into(clf, mae.encoder.state_dict())
    assert report["ignored"] == ["norm.weight", "norm.bias"]
    assert set(report["missing"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert not any(k.startswith("norm.") for k in clf.state_dict())
    assert clf.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    imgs = torch.randn(2, 3, 16, 16)
    # reference: encoder blocks without the final norm, mean of patch tokens (CLS excluded), then a fresh LN
    enc = mae.encoder
    x = enc.patch_embed(imgs)
    x = torch.cat([enc.cls_token.expand(2, -1, -1), x], 1) + enc.pos_embed
    x = enc.blocks(x)[:, 1:].mean(1)  # [N, D]
    ref = F.layer_norm(x, (32,), eps=1e-6)
    torch.testing.assert_close(clf.forward_head(clf.forward_features(imgs), pre_logits=True), ref)


def test_head_init_is_tiny():
    clf = create_classifier(TINY, num_classes=100)
    assert clf.head.weight.std().item() == pytest.approx(2e-5, rel=0.2)
    assert clf.head.weight.abs().max() < 6 * 2e-5  # timm's cut-off is +-2 absolute, i.e. none at this std
    assert torch.count_nonzero(clf.head.bias) == 0
    with pytest.raises(ValueError, match="global_pool"):
        create_classifier(TINY, 10, global_pool="max")


def test_pos_embed_interpolated_to_new_resolution(mae):
    clf = create_classifier(mae.encoder_cfg, num_classes=3, img_size=24)
    report = load_encoder_into(clf, mae.encoder.state_dict())
    assert report["resized"] == {"pos_embed": ([4, 4], [6, 6])}
    old = mae.encoder.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)  # [1, D, 4, 4]
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(clf.pos_embed[:, 1:].detach(), ref)
    assert torch.equal(clf.pos_embed[:, :1].detach(), old[:, :1])
    assert clf.pos_embed.requires_grad  # trainable when fine-tuning
    assert clf(torch.randn(1, 3, 24, 24)).shape == (1, 3)


def test_mismatched_checkpoint_names_keys_and_shapes(mae):
    deeper = create_classifier({**mae.encoder_cfg, "depth": 3}, num_classes=3)
    with pytest.raises(CheckpointMismatch) as err:
        load_encoder_into(deeper, mae.state_dict())
    assert "missing key" in str(err.value) and "blocks.2.attn.qkv.weight [96, 32]" in str(err.value)
    wider = create_classifier({**mae.encoder_cfg, "embed_dim": 64}, num_classes=3)
    with pytest.raises(CheckpointMismatch) as err:
        load_encoder_into(wider, mae.state_dict())
    msg = str(err.value)
    assert "shape mismatch" in msg and "blocks.0.mlp.fc1.weight: checkpoint [128, 32] vs model [256, 64]" in msg
    assert err.value.mismatched["cls_token"] == ((1, 1, 32), (1, 1, 64))
