"""Checkpoint import/export: official MAE files, timm-named encoder export, safe loading, clear mismatch errors."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from models.convert import (
    detect_format,
    load_mae_weights,
    load_state_dict,
    main,
    save_encoder,
    to_encoder_state_dict,
    to_mae_state_dict,
    to_official,
)
from models.mae import MaskedAutoencoder
from models.state_check import CheckpointMismatch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(seed):
    torch.manual_seed(seed)
    return MaskedAutoencoder(**TINY).eval()


class NotAllowed:  # a pickled object of this class must not be loaded
    pass


def test_official_full_checkpoint_roundtrip(tmp_path):
    src, dst = tiny(0), tiny(1)
    official = to_official(src.state_dict())
    assert "blocks.0.attn.qkv.weight" in official and "decoder_blocks.0.mlp.fc1.weight" in official
    assert "mask_token" in official and not any(k.startswith("encoder.") for k in official)
    path = tmp_path / "mae_full.pth"
    # the official trainer's layout, including its pickled argparse.Namespace
    torch.save({"model": official, "epoch": 7, "args": argparse.Namespace(lr=1e-3)}, path)
    sd = load_state_dict(path)
    assert detect_format(sd) == "official"
    report = load_mae_weights(dst, sd)
    assert report["missing"] == []
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    for a, b in zip(src(imgs, noise=noise), dst(imgs, noise=noise)):
        assert torch.equal(a, b)


def test_encoder_only_checkpoint_keeps_fresh_decoder(tmp_path):
    src, dst = tiny(0), tiny(1)
    dec_before = dst.decoder_pred.weight.clone()
    enc_only = to_encoder_state_dict(src.state_dict())
    assert detect_format(enc_only) == "timm" and "norm.weight" in enc_only
    assert not any(k.startswith(("decoder", "mask_token")) for k in enc_only)
    report = load_mae_weights(dst, {f"module.{k}": v for k, v in enc_only.items()})  # DDP prefix is stripped
    assert "decoder_pred.weight" in report["missing"] and "mask_token" in report["missing"]
    assert torch.equal(dst.encoder.blocks[1].mlp.fc2.weight, src.encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(dst.decoder_pred.weight, dec_before)
    with pytest.raises(CheckpointMismatch, match="decoder_pred.weight"):
        load_mae_weights(dst, enc_only, require_decoder=True)


def test_exported_encoder_loads_in_timm_with_same_features(tmp_path):
    m = tiny(0)
    path = save_encoder(m.state_dict(), tmp_path / "encoder.safetensors", encoder_cfg=m.encoder_cfg)
    assert set(load_file(str(path))) == set(m.encoder.state_dict())
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    imgs = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit(imgs), m.encoder(imgs), rtol=0, atol=0)
    latent = m.forward_encoder(imgs, 0.0, torch.arange(16.0).expand(2, -1))[0]  # identity order, nothing masked
    torch.testing.assert_close(vit.forward_features(imgs), latent, rtol=1e-5, atol=1e-5)


def test_cli_writes_encoder_and_mae(tmp_path):
    m = tiny(0)
    src = tmp_path / "full.pth"
    torch.save({"model": to_official(m.state_dict())}, src)
    out = tmp_path / "enc.safetensors"
    assert main(["--input", str(src), "--output", str(out)]) == 0
    assert set(load_file(str(out))) == set(m.encoder.state_dict())
    out_mae = tmp_path / "mae.safetensors"
    assert main(["--input", str(src), "--output", str(out_mae), "--to", "mae"]) == 0
    assert set(load_file(str(out_mae))) == set(m.state_dict())
    out_hf = tmp_path / "hf.safetensors"
    assert main(["--input", str(src), "--output", str(out_hf), "--to", "hf"]) == 0
    hf_sd = load_file(str(out_hf))
    assert "vit.encoder.layer.1.attention.attention.value.weight" in hf_sd  # hub (v4) names, q/k/v split
    back = to_mae_state_dict(hf_sd)
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    # as a script, from another directory
    res = subprocess.run([sys.executable, str(ROOT / "models" / "convert.py"), "--input", str(src), "--output",
                          str(tmp_path / "enc2.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "official format" in res.stdout and (tmp_path / "enc2.safetensors").is_file()


def test_loading_refuses_arbitrary_objects_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "extra": NotAllowed()}, bad)
    with pytest.raises(ValueError, match="refusing"):
        load_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_state_dict(tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        detect_format({"foo.weight": torch.zeros(1)})


def test_wrong_architecture_lists_keys_and_shapes():
    other = MaskedAutoencoder(**{**TINY, "embed_dim": 48, "depth": 1, "num_heads": 3})
    with pytest.raises(CheckpointMismatch) as err:
        load_mae_weights(other, tiny(0).state_dict())
    msg = str(err.value)
    assert "encoder.cls_token: checkpoint [1, 1, 32] vs model [1, 1, 48]" in msg
    assert "unexpected key" in msg and "encoder.blocks.1.norm1.weight [32]" in msg
    assert "decoder_embed.weight: checkpoint [16, 32] vs model [16, 48]" in msg


def test_mae_state_dict_is_identity_on_our_format():
    sd = tiny(0).state_dict()
    assert detect_format(sd) == "tessera"
    out = to_mae_state_dict(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)
