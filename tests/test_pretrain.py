"""pretrain/mae.py in one process: configs load, the default model learns (short run), outputs are usable,
non-finite losses skip the update, a changed model refuses to resume (pre-emption: tests/test_preemption.py)."""

import subprocess

import pytest
import torch
from helpers_launch import ROOT, read_metrics, tiny_args, train_rows
from safetensors.torch import load_file

from launch.checkpoint import ResumeMismatch
from launch.config import load_config
from launch.loop import NonFiniteLossError
from pretrain import mae as pretrain_mae
from pretrain.config import PretrainConfig

CONFIGS = sorted((ROOT / "pretrain" / "configs").glob("*.yaml"))


def test_every_config_loads_and_recipes_hold():
    assert {p.name for p in CONFIGS} >= {"sample.yaml", "cifar10.yaml", "in1k_vit_base.yaml", "in1k_vit_large.yaml",
                                        "in1k_vit_huge.yaml"}
    for path in CONFIGS:
        load_config(PretrainConfig, [str(path)])
    for size in ("base", "large", "huge"):
        cfg = load_config(PretrainConfig, [str(ROOT / f"pretrain/configs/in1k_vit_{size}.yaml")])
        global_batch = cfg.data.micro_batch * 8 * cfg.optim.grad_accum_steps  # 8 GPUs, as the comments say
        assert global_batch == 4096
        assert cfg.optim.peak_lr(global_batch) == pytest.approx(2.4e-3)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
        assert cfg.run.steps == round(800 * 1281167 / 4096) and cfg.optim.warmup_steps == int(40 * 1281167 / 4096)
        assert cfg.model.norm_pix_loss and cfg.model.img_size == 224
    assert load_config(PretrainConfig, [str(ROOT / "pretrain/configs/sample.yaml")]) == PretrainConfig()


@pytest.mark.slow
def test_default_model_loss_falls_and_outputs_load(tmp_path):
    # the default model and data, shortened: 16 steps of 16 images
    args = [f"run.output_dir={tmp_path}", "run.steps=16", "data.micro_batch=16", "data.num_workers=0",
            "run.log_every=4", "run.save_every=0", "run.progress=false", "run.trackers=none", "optim.warmup_steps=4",
            "vis.num_images=4", "knn.bank_size=100", "knn.query_size=50", "run.eval_every=8"]
    pretrain_mae.main(args)
    losses = [r["loss"] for r in train_rows(tmp_path)]
    assert len(losses) == 4
    assert losses[-1] < 0.75 * losses[0], losses
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert (tmp_path / "reconstructions" / "step_000008.png").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "step_000016").is_dir()
    # encoder.safetensors holds timm key names and loads strictly into a timm ViT of the same shape
    from models.vit import create_encoder

    mae = pretrain_mae.build_model(load_config(PretrainConfig, args))
    encoder = create_encoder(**mae.encoder_cfg)
    encoder.load_state_dict(load_file(tmp_path / "encoder.safetensors"), strict=True)
    full = load_file(tmp_path / "mae.safetensors")
    assert full["decoder_pred.weight"].dtype == torch.float32
    mae.load_state_dict(full, strict=True)


def test_nonfinite_loss_skips_update_then_stops(tmp_path, monkeypatch):
    from models.mae import MaskedAutoencoder

    def nan_loss(self, imgs, pred, mask):
        return (pred * float("nan")).mean()

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", nan_loss)
    args = tiny_args(tmp_path, "run.max_nonfinite=3", steps=5)
    with pytest.raises(NonFiniteLossError) as err:
        pretrain_mae.main(args)
    msg = str(err.value)
    assert "3 consecutive non-finite losses" in msg and "lower learning rate" in msg and "bf16" in msg
    assert "clip_grad" in msg

    # one non-finite step: the update is skipped (weights unchanged), counted, and the run goes on
    run_dir = tmp_path / "once"
    args = tiny_args(run_dir, steps=1)
    pretrain_mae.main(args)
    cfg = load_config(PretrainConfig, args)
    torch.manual_seed(cfg.run.seed)
    initial = pretrain_mae.build_model(cfg).state_dict()
    saved = load_file(run_dir / "mae.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in initial.items())
    assert read_metrics(run_dir)[-1]["n_nonfinite"] == 1
    assert read_metrics(run_dir)[-1]["loss"] is None  # strict JSON: null, not NaN


def test_resume_with_changed_model_is_refused(tmp_path):
    pretrain_mae.main(tiny_args(tmp_path, steps=1))
    with pytest.raises(ResumeMismatch) as err:
        pretrain_mae.main(tiny_args(tmp_path, "model.overrides.depth=3", steps=2))
    msg = str(err.value)
    assert "cannot resume" in msg and "model.overrides.depth: 2 -> 3" in msg and "\n" not in msg


def test_launcher_files_parse():
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    yamls = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "launch" / "accelerate").glob("*.yaml")}
    assert set(yamls) >= {"cpu_2proc", "gpu1", "ddp8", "zero2", "zero3", "multinode"}
    assert yamls["zero3"].deepspeed_config["deepspeed_config_file"] == "launch/deepspeed/zero3.json"
    assert yamls["multinode"].num_machines == 2
    for stage in (2, 3):
        ds = json.loads((ROOT / f"launch/deepspeed/zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW, lr set by the loop
    sbatch = ROOT / "launch" / "slurm" / "pretrain.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0  # run as written: tests/test_launch_files.py


def test_nonfinite_streak_names_the_last_checkpoint_before_it(tmp_path, monkeypatch):
    from models.mae import MaskedAutoencoder

    real, calls = MaskedAutoencoder.forward_loss, []

    def loss_then_nan(self, imgs, pred, mask):
        calls.append(1)
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) > 3 else loss  # steps 4, 5, ... diverge

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", loss_then_nan)
    args = tiny_args(tmp_path, "run.max_nonfinite=3", "run.save_every=2", steps=8)
    with pytest.raises(NonFiniteLossError) as err:
        pretrain_mae.main(args)
    msg = str(err.value)
    # checkpoints at steps 2 (before the streak) and 4 (inside it): the advice names step 2's
    assert "3 consecutive non-finite losses" in msg
    assert f"resume from {tmp_path / 'checkpoints' / 'step_000002'}" in msg, msg
