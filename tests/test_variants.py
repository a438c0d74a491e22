"""Named variants: exact parameter counts (meta device for the large ones) and small variants that run."""

import pytest
import timm
import torch

from models.variants import MAE_VARIANTS, create_mae, variant_kwargs


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_base_counts_exact():
    with torch.device("meta"):  # same modules, no memory or init cost
        mae = create_mae("mae_vit_base_patch16_dec512d8b")
        ref = timm.create_model("vit_base_patch16_224", num_classes=0)
    assert n_params(mae) == 111_907_840  # fixed sin-cos pos-embeds included, as the official count
    assert n_params(mae.encoder) == 85_798_656
    assert n_params(ref) == n_params(mae.encoder)
    shapes = {k: v.shape for k, v in mae.encoder.state_dict().items()}
    assert {k: v.shape for k, v in ref.state_dict().items()} == shapes


def analytic_mae_params(embed_dim, depth, patch_size, img_size, decoder_embed_dim, decoder_depth, in_chans=3,
                        mlp_ratio=4, **_):
    """Parameter count written out by hand: blocks, embeddings, norms, decoder."""
    def block(d):
        h = int(d * mlp_ratio)
        return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)

    tokens = (img_size // patch_size) ** 2 + 1
    pix = patch_size * patch_size * in_chans
    enc = pix * embed_dim + embed_dim + embed_dim + tokens * embed_dim + depth * block(embed_dim) + 2 * embed_dim
    dd = decoder_embed_dim
    dec = (embed_dim * dd + dd) + dd + tokens * dd + decoder_depth * block(dd) + 2 * dd + (dd * pix + pix)
    return enc, enc + dec


@pytest.mark.parametrize("name,timm_name", [
    ("mae_vit_large_patch16_dec512d8b", "vit_large_patch16_224"),
    ("mae_vit_huge_patch14_dec512d8b", "vit_huge_patch14_224"),
    ("mae_vit_small_patch16_dec512d8b", "vit_small_patch16_224"),
    ("mae_vit_tiny_patch4_dec128d2b", None),
])
def test_counts_match_hand_count_and_timm(name, timm_name):
    enc, total = analytic_mae_params(**MAE_VARIANTS[name])
    with torch.device("meta"):
        mae = create_mae(name)
        if timm_name:
            assert n_params(timm.create_model(timm_name, num_classes=0)) == enc
    assert n_params(mae.encoder) == enc
    assert n_params(mae) == total


def test_official_large_total():
    enc, total = analytic_mae_params(**MAE_VARIANTS["mae_vit_large_patch16_dec512d8b"])
    assert (enc // 10**6, total // 10**6) == (303, 329)  # ViT-L 303M encoder / 329M total, as published


def test_names_carry_hyperparameters():
    for name, kw in MAE_VARIANTS.items():
        assert f"patch{kw['patch_size']}" in name
        assert f"dec{kw['decoder_embed_dim']}d{kw['decoder_depth']}b" in name
        assert kw["decoder_embed_dim"] % kw["decoder_num_heads"] == 0


def test_small_variants_run_and_overrides_apply():
    m = create_mae("mae_vit_tiny_patch2_dec192d4b", depth=1, decoder_depth=1, in_chans=1, norm_pix_loss=True)
    assert m.norm_pix_loss and m.encoder_cfg["in_chans"] == 1 and len(m.encoder.blocks) == 1
    loss, pred, mask = m(torch.randn(2, 1, 32, 32))
    assert pred.shape == (2, 256, 4) and mask.sum().item() == 2 * 192 and torch.isfinite(loss)
    with pytest.raises(KeyError, match="unknown MAE variant"):
        variant_kwargs("mae_vit_gigantic")
