"""The one weights reader (`launch/weights.py`): the same encoder weights written in every source format it replaced
four readers for (our encoder.safetensors, a pretraining run directory, an official MAE .pth, a Hugging Face ViTMAE
directory, timm weights with timm:NAME, a fine-tuning run's classifier, a ZeRO-3 consolidation in shards) are read
back as the same tensors; the architecture and head count come from where they are recorded; bad sources are one
line naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MAE, tiny_mae
from safetensors.torch import save_file

from core.errors import UserError
from launch.weights import classifier_model, mae_model, read_weights


@pytest.fixture
def mae():
    model = tiny_mae(seed=3).eval()
    with torch.no_grad():  # make every tensor distinct from a fresh init of the same seed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def encoder_sd(mae) -> dict:
    return {k[len("encoder."):]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}


def same(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:4]


def test_every_source_format_gives_the_same_encoder(mae, tmp_path):
    from models.convert import save_encoder, to_hf_state_dict, to_official
    from models.mae import MaskedAutoencoder

    want = encoder_sd(mae)
    sources = {}
    sources["ours"] = save_encoder(mae.state_dict(), tmp_path / "encoder.safetensors",
                                   encoder_cfg=mae.encoder_cfg)
    run = tmp_path / "run"  # a pretraining run directory: its full model and its config.yaml
    run.mkdir()
    save_file(mae.state_dict(), str(run / "mae.safetensors"))
    (run / "config.yaml").write_text(json.dumps({"model": {"name": "mae_vit_tiny_patch4_dec128d2b",
                                                           "overrides": {k: v for k, v in TINY_MAE.items()
                                                                         if k != "img_size"},
                                                           "img_size": TINY_MAE["img_size"]}}))
    sources["run"] = run
    torch.save({"model": to_official(mae.state_dict()), "epoch": 3}, tmp_path / "official.pth")
    sources["official"] = tmp_path / "official.pth"
    hf = tmp_path / "hf"  # an HF ViTMAE directory: weights under transformers' names and its config.json
    hf.mkdir()
    save_file(to_hf_state_dict(mae.state_dict()), str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({
        "model_type": "vit_mae", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "image_size": 16, "patch_size": 4, "num_channels": 3, "decoder_hidden_size": 16,
        "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64}))
    sources["hf"] = hf
    zero = tmp_path / "zero3"  # zero_to_fp32's sharded output: shards and an index
    zero.mkdir()
    full = mae.state_dict()
    names = sorted(full)
    halves = {"model-00001.safetensors": names[: len(names) // 2], "model-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: full[k] for k in keys}, str(zero / shard))
    (zero / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    sources["zero3"] = zero
    for name, source in sources.items():
        w = read_weights(str(source), want="encoder", num_heads=2 if name in ("official", "zero3") else None)
        same(w.state_dict, want)
        assert w.encoder_cfg["embed_dim"] == 32 and w.encoder_cfg["num_heads"] == 2, (name, w.encoder_cfg)
        assert w.identity.startswith("sha256:")
    # the whole pretrainer from the same sources, under our names
    for name in ("run", "official", "hf", "zero3"):
        same(read_weights(str(sources[name]), want="pretrainer").state_dict, mae.state_dict())
    # and what is rebuilt from it draws like the original
    rebuilt, kwargs = mae_model(read_weights(str(sources["run"]), want="any"))
    assert isinstance(rebuilt, MaskedAutoencoder) and kwargs["num_heads"] == 2 and kwargs["decoder_num_heads"] == 2
    same(rebuilt.state_dict(), mae.state_dict())


def test_timm_source_and_classifier_run(tmp_path):
    from finetune.export import save_classifier
    from models.classifier import create_classifier
    from models.vit import create_encoder

    torch.manual_seed(0)
    vit = create_encoder(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    torch.save(vit.state_dict(), tmp_path / "tiny224.pth")
    w = read_weights("timm:vit_tiny_patch16_224", weights=str(tmp_path / "tiny224.pth"))
    same(w.state_dict, {k: v for k, v in vit.state_dict().items()})
    assert w.encoder_cfg == {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 192, "depth": 12,
                             "num_heads": 3, "mlp_ratio": 4.0}
    with pytest.raises(UserError, match="needs a weights file"):
        read_weights("timm:vit_tiny_patch16_224")
    with pytest.raises(UserError, match="does not fit.*embed_dim: model 384 vs weights 192"):
        read_weights("timm:vit_small_patch16_224", weights=str(tmp_path / "tiny224.pth"))
    # a fine-tuning run: the classifier with its classifier.json, and its encoder part
    cfg = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}
    clf = create_classifier(cfg, 5, global_pool="token").eval()
    run = tmp_path / "ft"
    save_classifier(clf.state_dict(), run / "classifier_best.safetensors",
                    {"kind": "vit", "encoder_cfg": cfg, "num_classes": 5, "pool": "token", "img_size": 16,
                     "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    got = classifier_model(read_weights(str(run), want="classifier"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(got(x), clf(x))
    same(read_weights(str(run), want="encoder").state_dict,
         {k: v for k, v in clf.state_dict().items() if not k.startswith("head.")})


def test_head_count_and_bad_sources(mae, tmp_path):
    from models.convert import to_official

    torch.save({"model": to_official(mae.state_dict())}, tmp_path / "official.pth")
    w = read_weights(str(tmp_path / "official.pth"))
    assert w.encoder_cfg["num_heads"] == 1 and w.notes  # 32 wide, nothing says: width/64, with a note saying so
    assert read_weights(str(tmp_path / "official.pth"), num_heads=2).encoder_cfg["num_heads"] == 2
    with pytest.raises(UserError, match="no such file"):
        read_weights(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")
    with pytest.raises(UserError, match="junk.safetensors"):
        read_weights(str(tmp_path / "junk.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder without weights"):
        read_weights(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is not a classifier"):
        read_weights(str(tmp_path / "official.pth"), want="classifier")
    with pytest.raises(UserError, match="needs arch="):
        read_weights("random")
