"""The pretraining augmentation knobs (`data.augment`, `data.crop_scale`, `data.hflip`): checked in the config, reach
the transform the run builds, and a run with `data.augment=none` trains."""

from __future__ import annotations

import pytest
import torch
from helpers_launch import SAMPLE, tiny_args
from PIL import Image

from data.transforms import eval_transform
from launch.config import ConfigError, load_config
from pretrain import mae as pretrain_mae
from pretrain.config import PretrainConfig


def transform_of(*overrides):
    cfg = pretrain_mae.with_dataset_defaults(load_config(PretrainConfig, [f"data.train={SAMPLE}", *overrides]), False)
    return pretrain_mae.train_transform(cfg), cfg


def test_defaults_are_the_mae_recipe_and_bad_values_are_errors():
    cfg = load_config(PretrainConfig, [])
    assert cfg.data.augment == "crop" and cfg.data.crop_scale == (0.2, 1.0) and cfg.data.hflip == 0.5
    for bad in ("data.crop_scale=0.5,0.2", "data.crop_scale=0,1", "data.hflip=1.5"):
        with pytest.raises(ConfigError, match="crop_scale|hflip"):
            load_config(PretrainConfig, [bad])


def test_the_knobs_reach_the_transform():
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())
    tf, cfg = transform_of("data.crop_scale=1,1", "data.hflip=0")
    reference = eval_transform(32, cfg.data.mean, cfg.data.std)(image)  # the whole image, not flipped
    for seed in range(5):  # whatever the draws: a crop of the full area, never flipped
        torch.manual_seed(seed)
        torch.testing.assert_close(tf(image), reference)
    none, _ = transform_of("data.augment=none")
    torch.testing.assert_close(none(image), reference)
    flipped, _ = transform_of("data.crop_scale=1,1", "data.hflip=1")
    torch.testing.assert_close(flipped(image), reference.flip(-1))


def test_a_run_without_augmentation_trains(tmp_path):
    out = pretrain_mae.main(tiny_args(tmp_path, "data.augment=none", "knn.enabled=false", steps=2))
    assert out["step"] == 2 and out["loss"] is not None
