"""Every objective and target end to end on CPU, as users run it:
`pretrain/mae.py pretrain/configs/<objective>.yaml` (plus size overrides) trains from the shipped shards, its loss
falls, it writes the documented files, its encoder.safetensors loads into timm and is the trained encoder, and
`finetune/linprobe.py encoder=RUN/encoder.safetensors` probes it. Also: data2vec's teacher is in the checkpoints
(a resumed run ends exactly as the uninterrupted one), and combinations the objectives do not define are refused in
one line."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from conftest import DOWNSTREAM, N_TEST, make_tiny_dataset
from helpers_launch import ROOT, SAMPLE, read_metrics
from safetensors.torch import load_file

from launch.config import load_config
from launch.errors import cli
from models.convert import to_encoder_state_dict
from models.vit import create_encoder, timm_model_args
from pretrain import mae as pretrain_mae
from pretrain.config import PretrainConfig

CONFIGS = ROOT / "pretrain" / "configs"
# size overrides only: a 2-block, 32-wide ViT with 8 px patches (16 patches), batch 32, 24 steps
ENCODER = ["model.overrides.patch_size=8", "model.overrides.embed_dim=32", "model.overrides.depth=2",
           "model.overrides.num_heads=2"]
DECODER = ["model.overrides.decoder_embed_dim=32", "model.overrides.decoder_depth=1",
           "model.overrides.decoder_num_heads=2"]
SIZE = [f"data.train={SAMPLE}", "data.micro_batch=32", "data.num_workers=0", "run.steps=24", "run.log_every=4",
        "run.save_every=0", "run.trackers=none", "run.progress=false", "run.precision=no", "optim.lr=3e-3",
        "optim.warmup_steps=4", "vis.num_images=2", "knn.enabled=false"]

CASES = {  # id: (config file, extra size overrides, full-weights file, reconstruction grid expected)
    "mae-hog": ("mae_hog.yaml", DECODER, "mae.safetensors", False),
    "simmim-pixels": ("simmim.yaml", [], "simmim.safetensors", True),
    "simmim-hog": ("simmim.yaml", ["model.target=hog"], "simmim.safetensors", False),
    "data2vec": ("data2vec.yaml", ["data2vec.top_k=2"], "data2vec.safetensors", False),
}


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("objectives") / "data")


def pretrain_args(case: str, run_dir) -> list[str]:
    config, extra, _, _ = CASES[case]
    return [str(CONFIGS / config), *ENCODER, *extra, *SIZE, f"run.output_dir={run_dir}"]


@pytest.mark.parametrize("case", list(CASES))
def test_objective_trains_exports_and_probes(case, tmp_path, probe_data):
    run = tmp_path / "pretrain"
    args = pretrain_args(case, run)
    pretrain_mae.main(args)
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses

    _, _, weights, recon = CASES[case]
    assert (run / weights).is_file() and (run / "reconstructions.png").is_file() == recon
    assert (run / "teacher_encoder.safetensors").is_file() == (case == "data2vec")
    cfg = load_config(PretrainConfig, args)
    model = pretrain_mae.build_model(cfg)
    model.load_state_dict(load_file(run / weights), strict=True)  # the full model, under its objective's name
    # encoder.safetensors: timm key names, loads into timm's own ViT and is the trained encoder
    encoder = load_file(run / "encoder.safetensors")
    assert set(encoder) == set(create_encoder(**model.encoder_cfg).state_dict())
    assert all(torch.equal(encoder[k], v) for k, v in to_encoder_state_dict(model.state_dict()).items())
    name, kwargs = timm_model_args(model.encoder_cfg)
    vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(run / "encoder.safetensors")),
                            num_classes=0, **kwargs).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.eval().encoder.forward_features(imgs))

    from finetune.linprobe import main as linprobe

    probe = tmp_path / "probe"
    linprobe([f"encoder={run / 'encoder.safetensors'}", f"data.train={probe_data}", f"run.output_dir={probe}",
              "run.steps=4", "optim.warmup_steps=1", *DOWNSTREAM])
    ev = json.loads((probe / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and 0 <= ev["top1"] <= 100
    assert ev["encoder"]["encoder_cfg"]["embed_dim"] == 32


def test_data2vec_resume_continues_the_teacher_exactly(tmp_path):
    run = tmp_path / "d2v"
    args = pretrain_args("data2vec", run)
    args = [a for a in args if not a.startswith(("run.steps=", "run.save_every="))] + ["run.steps=4",
                                                                                       "run.save_every=2"]
    pretrain_mae.main(args)
    full = {f: load_file(run / f) for f in ("teacher_encoder.safetensors", "data2vec.safetensors")}
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if killed after the step-2 checkpoint
    for f in full:
        (run / f).unlink()
    out = pretrain_mae.main(args)
    assert out["step"] == 4
    for f, ref in full.items():
        got = load_file(run / f)
        different = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not different, f"{f}: differs from the uninterrupted run: {different[:4]}"
    # the teacher really moved away from the student (else this test could not tell a lost teacher apart)
    student = to_encoder_state_dict(full["data2vec.safetensors"])
    teacher = full["teacher_encoder.safetensors"]
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("override,message", [
    (["model.objective=data2vec", "model.target=hog"], "model.objective=data2vec regresses its teacher's features"),
    (["model.objective=data2vec", "model.target=pixels"], "leave model.target unset"),
    (["model.target=hog", "model.norm_pix_loss=true"], "model.norm_pix_loss=true applies to pixel targets only"),
    (["model.objective=simmim", "model.overrides.decoder_depth=1"], "model.objective=simmim has no decoder"),
    (["model.objective=mae", "model.target=hog", "hog.cell=3"], "HOG cell size 3 must divide the patch size 4"),
])
def test_undefined_combinations_are_refused_in_one_line(override, message, tmp_path, capsys):
    # as the script runs main: user errors become `pretrain/mae.py: error: ...` and exit code 2
    with pytest.raises(SystemExit) as err:
        cli(pretrain_mae.PROG, pretrain_mae.main)([*override, f"run.output_dir={tmp_path}", "run.trackers=none"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert text.startswith("pretrain/mae.py: error: ") and text.count("\n") == 1, text
    assert message in text, text
