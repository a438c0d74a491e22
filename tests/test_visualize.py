"""The visualisation CLI (pictures/visualize.py) on tiny real models: PNG sizes, attention that lands where a
constructed model puts it (in the maps and in the picture), MAE checkpoints in our and the official layout,
heat-map colours from matplotlib's colormaps, clear errors for checkpoints of the wrong kind, and the documented
command run as a user runs it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers_attention import force_cls_onto
from PIL import Image
from safetensors.torch import save_file

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from models.convert import save_encoder, to_official
from models.mae import MaskedAutoencoder
from models.vit import create_encoder
from pictures.heatmap import colormap, overlay
from pictures.image_input import load_images
from pictures.recon_grid import reconstruct, save_reconstruction_grid
from pictures.visualize import main

REPO = Path(__file__).resolve().parents[1]

MAE_ARGS = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)
CELL, PAD = 128, 2  # 32 px images are drawn 4x; grid padding


def _mae(seed=0):
    torch.manual_seed(seed)
    return MaskedAutoencoder(**MAE_ARGS, norm_pix_loss=True).eval()


def _run_dir(tmp_path, mae):
    """A pretraining run directory as pretrain/mae.py leaves it: mae.safetensors + config.yaml naming the variant."""
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(run / "mae.safetensors"))
    overrides = {k: MAE_ARGS[k] for k in MAE_ARGS if k != "img_size"}
    cfg = {
        "model": {
            "name": "mae_vit_tiny_patch4_dec128d2b",
            "img_size": 32,
            "mask_ratio": 0.75,
            "mask_type": "random",
            "norm_pix_loss": True,
            "overrides": {k: str(v) for k, v in overrides.items()},
        },
        "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_mae_run_dir_gives_attention_and_reconstruction_pngs(tmp_path):
    mae = _mae()
    run = _run_dir(tmp_path, mae)
    out = tmp_path / "vis"
    res = main(
        [
            f"checkpoint={run}",
            "vis.images=data/sample:test",
            "vis.num_images=2",
            f"run.output_dir={out}",
            "vis.head_layer=0",
        ]
    )
    assert res["read_as"] == "mae" and res["format"] == "tessera"
    assert res["architecture"]["num_heads"] == 2 and res["architecture"]["norm_pix_loss"] is True
    assert res["notes"] == [] and res["mean"] == [0.5, 0.5, 0.5]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention_heads_block0.png", "attention_layers.png", "reconstruction.png", "summary.json"]
    layers, heads, recon = (
        _png(out / n) for n in ("attention_layers.png", "attention_heads_block0.png", "reconstruction.png")
    )
    rows = 2 * (CELL + PAD) + PAD
    # columns: image, block 0, block 1, rollout | image, head 0, head 1, mean | the four reconstruction columns
    for pic, cols in ((layers, 4), (heads, 4), (recon, 4)):
        assert pic.shape[1] == cols * (CELL + PAD) + PAD
        assert rows < pic.shape[0] < rows + 40  # plus the title row
    maps = res["maps"]
    assert maps["block0"].shape == (2, 4, 4) and maps["rollout"].shape == (2, 4, 4)
    torch.testing.assert_close(maps["block0_heads"].mean(1), maps["block0"])
    assert ((maps["block1"].flatten(1).sum(-1) > 0) & (maps["block1"].flatten(1).sum(-1) <= 1 + 1e-6)).all()


def test_forced_attention_shows_up_on_the_chosen_patch_of_the_picture(tmp_path):
    rng = np.random.default_rng(0)
    picture = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(picture)
    x = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)(Image.open(picture).convert("RGB"))[None]  # what the CLI sees
    torch.manual_seed(0)
    vit = create_encoder(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    r, c = 1, 3
    force_cls_onto(vit, x, r * 4 + c)
    cfg = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
    weights = save_encoder(vit.state_dict(), tmp_path / "enc" / "encoder.safetensors", encoder_cfg=cfg)
    out = tmp_path / "vis"
    res = main(
        [
            f"checkpoint={weights}",
            f"vis.images={picture}",
            f"run.output_dir={out}",
            "vis.alpha=1.0",
            "vis.rollout=false",
            "vis.head_layer=null",
            "vis.layers=-1",
        ]
    )
    assert res["read_as"] == "encoder" and res["notes"] == []
    heat = res["maps"]["block1"][0]  # [4, 4]
    assert heat[r, c] > 0.999
    # the picture: with vis.alpha=1 a cell is pure colormap; its hottest colour sits only inside patch (r, c)
    pic = _png(out / "attention_layers.png").astype(int)
    assert pic.shape[1] == 2 * (CELL + PAD) + PAD
    top = pic.shape[0] - (CELL + PAD)  # the cell's first row (the title row sits above)
    cell = pic[top : top + CELL, 2 * PAD + CELL : 2 * PAD + 2 * CELL]  # [128, 128, 3], column "block 1"
    hottest = np.abs(cell - colormap(np.array(1.0), "jet")).sum(-1) <= 3
    ys, xs = np.nonzero(hottest)
    assert len(ys) > 0
    assert (ys // 32 == r).all() and (xs // 32 == c).all()


def test_official_layout_mae_reconstructs_like_the_model_it_came_from(tmp_path):
    mae = _mae(seed=1)
    path = tmp_path / "official.pth"
    torch.save({"model": to_official(mae.state_dict())}, path)
    out = tmp_path / "vis"
    res = main(
        [
            f"checkpoint={path}",
            "vis.images=data/sample:test",
            "vis.num_images=2",
            f"run.output_dir={out}",
            "vis.attention=false",
            "vis.reconstruction=yes",
            "data.mean=0.5,0.5,0.5",
            "data.std=0.25,0.25,0.25",
        ]
    )
    assert res["read_as"] == "mae" and res["format"] == "official"
    notes = " ".join(res["notes"])
    assert "num_heads=" in notes and "norm_pix_loss" in notes  # heads and targets are guessed, and it says so
    assert [p.name for p in sorted(out.iterdir())] == ["reconstruction.png", "summary.json"]
    # the same weights with the right heads and norm-pix targets reproduce the original model's grid exactly
    out2 = tmp_path / "vis2"
    main(
        [
            f"checkpoint={path}",
            "vis.images=data/sample:test",
            "vis.num_images=2",
            f"run.output_dir={out2}",
            "vis.attention=false",
            "num_heads=2",
            "decoder_num_heads=2",
            "norm_pix_loss=true",
            "data.mean=0.5,0.5,0.5",
            "data.std=0.25,0.25,0.25",
        ]
    )
    images, _ = load_images("data/sample:test", 2, eval_transform(32, (0.5,) * 3, (0.25,) * 3))
    ref = save_reconstruction_grid(mae, images, tmp_path / "ref.png", (0.5,) * 3, (0.25,) * 3)
    assert np.array_equal(_png(out2 / "reconstruction.png"), _png(ref))
    assert reconstruct(mae, images)["mask"].sum() > 0


def _user_error(argv, capsys) -> str:
    """The command (main under the CLI's error handling) must stop with exit code 2 and one
    `pictures/visualize.py: error: ...` line; returns the line."""
    from launch.errors import cli
    from pictures.visualize import PROG

    with pytest.raises(SystemExit) as exit_info:
        cli(PROG, main)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("pictures/visualize.py: error: ") and err.count("\n") == 1
    return err


def test_wrong_kind_of_checkpoint_is_a_clear_error(tmp_path, capsys):
    torch.manual_seed(0)
    vit = create_encoder(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    enc = save_encoder(vit.state_dict(), tmp_path / "encoder.safetensors")
    err = _user_error([f"checkpoint={enc}", "vis.reconstruction=yes", f"run.output_dir={tmp_path / 'o'}"], capsys)
    assert re.search(r"encoder-only weights.*without the MAE decoder.*mae\.safetensors", err)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    err = _user_error([f"checkpoint={junk}", f"run.output_dir={tmp_path / 'o'}"], capsys)
    assert re.search(r"cannot read .*junk\.pth as weights: expected", err)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, resnet)
    assert "not a ViT encoder, MAE or classifier" in _user_error([f"checkpoint={resnet}"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder without weights" in _user_error([f"checkpoint={empty}"], capsys)
    err = _user_error(
        [
            f"checkpoint={enc}",
            "vis.images=data/sample:test",
            "vis.num_images=1",
            "vis.layers=5",
            f"run.output_dir={tmp_path / 'o3'}",
        ],
        capsys,
    )
    assert "layer 5 does not exist" in err


def test_classifier_weights_draw_attention_but_refuse_reconstruction(tmp_path, capsys):
    torch.manual_seed(0)
    clf = create_encoder(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, global_pool="avg"
    )  # the MAE fine-tuning layout: fc_norm + head, no final norm
    path = tmp_path / "finetuned.pth"
    torch.save({"model": clf.state_dict()}, path)
    out = tmp_path / "vis"
    res = main(
        [
            f"checkpoint={path}",
            "vis.images=data/sample:test",
            "vis.num_images=1",
            f"run.output_dir={out}",
            "num_heads=2",
        ]
    )
    assert res["read_as"] == "classifier"
    assert (out / "attention_layers.png").is_file() and not (out / "reconstruction.png").exists()
    assert "a classifier" in _user_error(
        [f"checkpoint={path}", "vis.reconstruction=yes", f"run.output_dir={out}"], capsys
    )


def test_colormap_and_overlay():
    # viridis ends are its published colours; jet runs from dark blue through green to dark red
    assert colormap(np.array([0.0, 1.0]), "viridis").tolist() == [[68, 1, 84], [253, 231, 37]]
    jet = colormap(np.array([0.0, 0.5, 1.0]), "jet").astype(int)
    assert jet[0].tolist() == [0, 0, 128] and jet[2].tolist() == [128, 0, 0]
    assert jet[1, 1] == 255 and 100 < jet[1, 0] < 150 and 100 < jet[1, 2] < 150  # the middle: full green
    assert colormap(torch.tensor([[-1.0, 2.0]]), "viridis").tolist() == [[[68, 1, 84], [253, 231, 37]]]  # clipped
    base = Image.new("RGB", (16, 8), (10, 20, 30))
    heat = torch.tensor([[0.0, 1.0]])  # left cold, right hot
    full = np.asarray(overlay(base, heat, alpha=1.0, cmap="jet")).astype(int)
    assert full.shape == (8, 16, 3)
    assert full[:, 0].tolist() == [[0, 0, 128]] * 8 and full[:, -1].tolist() == [[128, 0, 0]] * 8
    none = np.asarray(overlay(base, heat, alpha=0.0))
    assert (none == [10, 20, 30]).all()
    with pytest.raises(ValueError, match="colormap"):
        colormap(np.zeros(2), "no_such_map")


@pytest.mark.slow
def test_documented_command_runs_as_a_user_runs_it(tmp_path):
    """`python pictures/visualize.py checkpoint=... run.output_dir=...` (README), plus size overrides; --help; a bad
    colormap is one error line with exit code 2."""
    run = _run_dir(tmp_path, _mae())
    out = tmp_path / "pictures"
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the checkout importable, as for the other subprocess tests
    cmd = [sys.executable, "pictures/visualize.py", f"checkpoint={run}", f"run.output_dir={out}", "vis.num_images=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["read_as"] == "mae" and len(summary["images"]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == [
        "attention_heads_block1.png",
        "attention_layers.png",
        "reconstruction.png",
    ]
    helped = subprocess.run(
        [sys.executable, "pictures/visualize.py", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert helped.returncode == 0 and "colormap (str)" in helped.stdout
    bad = subprocess.run(
        cmd + ["vis.colormap=no_such_map"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "no_such_map" in bad.stderr and "Traceback" not in bad.stderr
