"""Continued pretraining (`model.init_from=`) from every source format, as a user runs it: `pretrain/mae.py` with
the tiny model, one step whose learning rate is 0 (warmup), so the exported weights are exactly what was loaded.

Sources made here: a Tessera run (its directory, mae.safetensors, encoder.safetensors), a ZeRO-3 consolidation
(sharded safetensors + index, as DeepSpeed's zero_to_fp32 writes), an official MAE .pth (models/convert.py's
inverse mapping, with the trainer's pickled args), a Hugging Face ViTMAE directory (transformers'
`save_pretrained`; its predictions are compared with ours) and timm weights (a classifier, head dropped).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import TINY_MODEL, make_tiny_dataset
from safetensors.torch import load_file, save_file

from launch.config import load_config
from launch.errors import cli
from pretrain import mae as pretrain_mae
from pretrain.config import PretrainConfig

TINY_ARCH = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)


def args_for(run_dir, data, *extra, steps=1):
    return [*TINY_MODEL, f"data.train={data}", "data.micro_batch=8", "data.num_workers=0", f"run.output_dir={run_dir}",
            f"run.steps={steps}", "run.log_every=1", "run.save_every=0", "run.trackers=none", "run.progress=false",
            "run.precision=no", "optim.warmup_steps=1", "vis.num_images=0", "knn.enabled=false", *extra]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 4-step tiny run and its dataset."""
    base = tmp_path_factory.mktemp("init")
    data = make_tiny_dataset(base / "data")
    run = base / "source"
    pretrain_mae.main(args_for(run, data, steps=4))
    return {"data": data, "run": run, "base": base, "mae": load_file(run / "mae.safetensors")}


def continue_from(spec, source, tmp_path, *extra) -> dict:
    run = tmp_path / "continued"
    out = pretrain_mae.main(args_for(run, source["data"], f"model.init_from={spec}", *extra))
    assert out["step"] == 1
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == 0.0  # a fresh schedule: warmup from 0, not the source's lr
    return load_file(run / "mae.safetensors")


def fresh_model_state(data, *extra) -> dict:
    cfg = load_config(PretrainConfig, args_for("unused", data, *extra))
    torch.manual_seed(cfg.run.seed)
    return pretrain_mae.build_model(cfg).state_dict()


def error_lines(capsys) -> list[str]:
    """The stderr lines from the error report on (transformers' save_pretrained draws a progress bar before)."""
    lines = capsys.readouterr().err.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("pretrain/mae.py: error:"))
    return lines[first:]


def assert_same(got: dict, want: dict, keys=None):
    keys = sorted(keys or want)
    assert keys and all(torch.equal(got[k], want[k]) for k in keys), [k for k in keys if not torch.equal(got[k],
                                                                                                         want[k])]


@pytest.mark.parametrize("which", ["run_dir", "mae.safetensors"])
def test_from_a_tessera_run_keeps_encoder_and_decoder(source, tmp_path, capsys, which):
    spec = source["run"] if which == "run_dir" else source["run"] / "mae.safetensors"
    got = continue_from(spec, source, tmp_path)
    assert_same(got, source["mae"])  # every tensor, decoder included
    assert "encoder + decoder" in capsys.readouterr().out


def test_from_an_encoder_file_the_decoder_starts_fresh(source, tmp_path, capsys):
    got = continue_from(source["run"] / "encoder.safetensors", source, tmp_path)
    assert_same(got, source["mae"], [k for k in got if k.startswith("encoder.")])
    fresh = fresh_model_state(source["data"])
    assert_same(got, fresh, [k for k in got if not k.startswith("encoder.")])
    assert "decoder starts fresh" in capsys.readouterr().out


def test_from_a_zero3_consolidation(source, tmp_path):
    shards = tmp_path / "zero3"
    shards.mkdir()
    keys = sorted(source["mae"])
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: source["mae"][k].clone() for k in part}, str(shards / name))
        weight_map.update({k: name for k in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same(continue_from(shards, source, tmp_path), source["mae"])


def test_from_an_official_pth(source, tmp_path):
    from models.convert import to_official

    official = to_official(source["mae"])
    assert "cls_token" in official and "decoder_embed.weight" in official  # the official names
    path = tmp_path / "checkpoint-3.pth"
    torch.save({"model": official, "epoch": 3, "args": argparse.Namespace(model="mae_vit_tiny")}, path)
    assert_same(continue_from(path, source, tmp_path), source["mae"])


def test_from_timm_weights_drops_the_head(source, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(**TINY_ARCH, num_classes=10, qkv_bias=True)  # a timm classifier of the same shape
    path = tmp_path / "timm_vit.pth"
    torch.save(vit.state_dict(), path)
    got = continue_from(path, source, tmp_path)
    want = {f"encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    assert_same(got, want)


def hf_model(eps: float):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          image_size=32, patch_size=8, num_channels=3, qkv_bias=True, decoder_hidden_size=32,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=128,
                          mask_ratio=0.75, norm_pix_loss=False, layer_norm_eps=eps)
    torch.manual_seed(2)
    return ViTMAEForPreTraining(config).eval()


def ours_vs_hf(state: dict, hf, data, *extra) -> float:
    """Largest difference between HF's and our predictions on the same images and masks."""
    cfg = load_config(PretrainConfig, args_for("unused", data, *extra))
    model = pretrain_mae.build_model(cfg).eval()
    if cfg.model.layer_norm_eps is not None:
        from launch.warm_start import set_layer_norm_eps

        set_layer_norm_eps(model, cfg.model.layer_norm_eps)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(3)
    images, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
        _, pred, mask = model(images, noise=noise)
    assert torch.equal(mask, theirs.mask)
    return float((pred - theirs.logits).abs().max())


def test_from_a_hugging_face_directory(source, tmp_path):
    hf = hf_model(eps=1e-6)
    hf.save_pretrained(tmp_path / "hf")
    got = continue_from(tmp_path / "hf", source, tmp_path)
    assert ours_vs_hf(got, hf, source["data"]) < 1e-5  # encoder and decoder: the same function as transformers'


def test_hugging_face_layer_norm_eps_is_read(source, tmp_path, capsys):
    hf = hf_model(eps=1e-12)  # transformers' default
    hf.save_pretrained(tmp_path / "hf12")
    with pytest.raises(SystemExit) as info:
        cli("pretrain/mae.py", pretrain_mae.main)(args_for(tmp_path / "bad", source["data"],
                                                           f"model.init_from={tmp_path / 'hf12'}"))
    assert info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "layer_norm_eps=1e-12" in err[0] and "model.layer_norm_eps=" in err[0]
    # the user's choice is applied to every LayerNorm: with 1e-12 the model is transformers' function exactly
    got = continue_from(tmp_path / "hf12", source, tmp_path, "model.layer_norm_eps=1e-12")
    assert ours_vs_hf(got, hf, source["data"], "model.layer_norm_eps=1e-12") < 1e-5


@pytest.mark.parametrize("extra,named", [
    (["model.overrides.embed_dim=48"], "encoder.cls_token: checkpoint [1, 1, 32] vs model [1, 1, 48]"),
    (["model.overrides.depth=3"], "encoder.blocks.2."),
    (["model.overrides.num_heads=4"], "num_heads=2 but the model 4"),
    (["model.overrides.decoder_embed_dim=64"], "its decoder does not fit"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(source, tmp_path, capsys, extra, named):
    with pytest.raises(SystemExit) as info:
        cli("pretrain/mae.py", pretrain_mae.main)(args_for(tmp_path / "bad", source["data"],
                                                           f"model.init_from={source['run']}", *extra))
    assert info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("pretrain/mae.py: error: model.init_from=") and named in err[0], err
