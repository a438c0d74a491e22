"""Numerical agreement with Hugging Face `ViTMAEForPreTraining` and import of every HF key spelling.

HF's from-scratch init is not used for anything: in transformers 5.23 it leaves the encoder and decoder position
embeddings all zero (a known trap of ViTMAE built from a config), so our weights, converted by models/convert.py, are
loaded into it. Sin-cos layout: HF builds the canonical [sin_h|cos_h|sin_w|cos_w] table and then swaps the two halves,
which gives exactly the official MAE layout (first half = column index) that ours uses; checked below.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from models.convert import detect_format, load_state_dict, to_hf_state_dict, to_mae_state_dict  # noqa: E402
from models.hf_keys import hf_to_official  # noqa: E402
from models.mae import MaskedAutoencoder  # noqa: E402
from models.pos_embed import sincos_2d  # noqa: E402

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)


def hf_config(norm_pix_loss):
    return ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        image_size=16, patch_size=4, num_channels=3, qkv_bias=True, layer_norm_eps=1e-6,
                        decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                        decoder_intermediate_size=64, mask_ratio=0.75, norm_pix_loss=norm_pix_loss,
                        hidden_act="gelu")


def in_memory_spelling(hf_model):
    return "v5" if any(k.startswith("vit.layers.") for k in hf_model.state_dict()) else "v4"


@pytest.fixture(scope="module", params=[False, True], ids=["pixels", "norm_pix"])
def pair(request):
    torch.manual_seed(0)
    ours = MaskedAutoencoder(**TINY, norm_pix_loss=request.param).eval()
    hf = ViTMAEForPreTraining(hf_config(request.param)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), in_memory_spelling(hf)), strict=True)
    return ours, hf


def test_same_weights_same_noise_same_loss_and_predictions(pair):
    ours, hf = pair
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.patchify(imgs), hf.patchify(imgs))


def test_hf_state_dict_converts_back_exactly(pair):
    ours, hf = pair
    back = to_mae_state_dict(hf.state_dict())
    assert back.keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_every_hf_spelling_imports(pair, tmp_path):
    ours, hf = pair
    ref = ours.state_dict()
    hf.save_pretrained(tmp_path)  # transformers 5.x writes decoder layers as decoder.decoder_encoder.layer.j
    saved = load_state_dict(tmp_path)
    spellings = {"saved": saved, "v4": to_hf_state_dict(ref, "v4"), "v5": to_hf_state_dict(ref, "v5")}
    assert any(".attention.attention.query." in k for k in spellings["v4"])
    assert any(".q_proj." in k for k in spellings["v5"])
    for name, sd in spellings.items():
        assert detect_format(sd) == "hf", name
        mae_sd = to_mae_state_dict(sd)
        assert mae_sd.keys() == ref.keys(), name
        assert all(torch.equal(mae_sd[k], ref[k]) for k in ref), name
    # a bare ViTMAEModel (no "vit." prefix, v4 names) maps to the encoder
    bare = {k[len("vit."):]: v for k, v in spellings["v4"].items() if k.startswith("vit.")}
    enc = hf_to_official(bare)
    assert all(torch.equal(enc[k], v) for k, v in ours.encoder.state_dict().items())


def test_hf_sincos_layout_equals_official_layout():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    canonical = build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=32, cls_token=True).float()
    half = 16
    swapped = torch.cat([canonical[:, half:], canonical[:, :half]], dim=1)  # what HF loads into its models
    torch.testing.assert_close(swapped, sincos_2d(32, 4, 4), rtol=0, atol=1e-6)
    assert not torch.allclose(canonical, sincos_2d(32, 4, 4))  # un-swapped order would differ
