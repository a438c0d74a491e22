"""Fine-tuning: end-to-end runs on tiny uneven shards (1 and 2 processes), exact resume, the model/criterion set-up,
and the bad-input errors raised before training. Tiny data/encoder helpers come from test_linprobe.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import N_TEST, TINY_ENC
from helpers_launch import launch_two
from safetensors.torch import load_file

FT = ["run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8", "data.eval_batch=4",
      "run.log_every=2", "optim.warmup_steps=1", "model.drop_path_rate=0.1"]


def _args(tiny, run, *extra):
    return [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={run}", *FT, *extra]


def test_classifier_gets_encoder_weights_head_init_and_layer_decay(tiny):
    from finetune.classify import build_classifier, build_criterion
    from finetune.config import FinetuneConfig
    from finetune.downstream import resolve_downstream
    from launch.config import load_config
    from launch.param_groups import param_groups
    from models.convert import load_state_dict

    cfg = load_config(FinetuneConfig, [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", "model.pool=avg",
                                       "model.head_init_std=0.02"])
    ds = resolve_downstream(cfg)
    assert ds.source.encoder_cfg == {**TINY_ENC, "num_heads": 2}  # heads from the safetensors metadata
    assert ds.num_classes == 3 and ds.test_spec.endswith(":test")  # data.test: the split next to data.train
    model, enc_cfg, report = build_classifier(ds, cfg)
    sd = load_state_dict(str(tiny["encoder"]))
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert model.fc_norm.weight.shape == (32,) and model.head.out_features == 3
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(model.head.bias, torch.zeros(3))
    groups = param_groups(model, 0.05, cfg.optim.layer_decay)
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[0] == pytest.approx(0.75 ** 3) and scales[3] == pytest.approx(1.0)  # depth 2: embed 0.75^3, head 1
    mixup, crit = build_criterion(cfg, 3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    xm, ym = mixup(x, y)
    assert ym.shape == (4, 3) and torch.allclose(ym.sum(1), torch.ones(4))
    cfg2 = load_config(FinetuneConfig, ["aug.mixup=0", "aug.cutmix=0", "aug.smoothing=0.1"])
    mixup2, crit2 = build_criterion(cfg2, 3)
    logits = torch.randn(4, 3, dtype=torch.float64)
    logp = logits.log_softmax(1)
    expect = (0.9 * -logp[torch.arange(4), y] + 0.1 * -logp.mean(1)).mean()  # hand-written label smoothing
    assert mixup2 is None and torch.allclose(crit2(logits, y), expect)


def test_finetune_end_to_end_avg_pool_mixup_ema(tiny):
    from finetune.classify import main

    run = tiny["base"] / "ft1"
    out = main(_args(tiny, run, "run.steps=4", "run.eval_every=2", "model.pool=avg", "ema.enabled=true",
                     "ema.decay=0.5", "run.save_every=0"))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and ev["steps"] == 4 and ev["ema"]["n_images"] == N_TEST
    assert ev["top1"] == out["top1"] and 0 <= ev["top1"] <= ev["top5"] <= 100
    meta = json.loads((run / "classifier.json").read_text())
    assert meta["kind"] == "vit" and meta["pool"] == "avg" and meta["num_classes"] == 3
    for name in ("classifier_best", "classifier_last", "classifier_ema_last"):
        sd = load_file(str(run / f"{name}.safetensors"))
        assert "fc_norm.weight" in sd and "head.weight" in sd and "norm.weight" not in sd
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "test_top1" in r] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged if "loss" in r)


def test_finetune_resume_is_exact(tiny):
    """A run resumed from its step-2 checkpoint ends with the same weights as the uninterrupted 4-step run."""
    from finetune.classify import main

    run = tiny["base"] / "resume"
    args = _args(tiny, run, "run.steps=4", "run.save_every=2", "run.eval_every=0")
    main(args)
    full = load_file(str(run / "classifier_last.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if killed after the step-2 checkpoint
    (run / "classifier_last.safetensors").unlink()
    main(args)
    resumed = load_file(str(run / "classifier_last.safetensors"))
    assert set(full) == set(resumed)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) >= 1 and steps.count(2) == 1


@pytest.mark.slow
def test_two_processes_finetune_counts_every_image_once(tiny, tmp_path):
    run = tmp_path / "ft2"
    ev_args = [f"checkpoint={run}", f"data.test={tiny['data']}:test", "data.num_workers=0", "data.eval_batch=3",
               "run.progress=false",
               f"output={tmp_path / 'ev2.json'}"]
    script = ("from finetune.classify import main\nfrom finetune.evaluate import main as evaluate\n"
              f"main({_args(tiny, run, 'run.steps=2', 'run.eval_every=1')!r})\nevaluate({ev_args!r})\n")
    launch_two(script, tmp_path)
    assert json.loads((tmp_path / "ev2.json").read_text())["n_images"] == N_TEST  # evaluate.py on 2 ranks too
    ev = json.loads((run / "eval.json").read_text())
    assert ev["world_size"] == 2 and ev["n_images"] == N_TEST
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "test_top1" in r] == [1, 2]
    assert (run / "classifier_best.safetensors").is_file()


def _bad(tiny, *extra):
    from core.errors import UserError
    from finetune.classify import main

    with pytest.raises((UserError, SystemExit)) as info:
        main(_args(tiny, tiny["base"] / "bad", "run.steps=1", *extra))
    return str(info.value)


def test_bad_inputs_fail_before_training(tiny):
    msg = _bad(tiny, "arch=mae_vit_small_patch4_dec256d4b")
    assert "does not fit" in msg and "embed_dim: model 384 vs weights 32" in msg
    assert "no such file or directory" in _bad(tiny, f"encoder={tiny['base'] / 'missing.pth'}")
    assert "num_classes=10" in _bad(tiny, "num_classes=10")
    assert "no labels" in _bad(tiny, f"data.test={tiny['data']}:nolabels")
    assert "even micro-batch" in _bad(tiny, "data.global_batch=7")
    corrupt = tiny["base"] / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    assert "cannot read" in _bad(tiny, f"encoder={corrupt}")
    assert not (tiny["base"] / "bad" / "checkpoints").exists()


def test_randaugment_posterize_zero_bits_shim():
    """timm's inc1 posterize at full magnitude keeps 0 bits; Pillow 13 raises, the shim gives the black image."""
    from PIL import Image
    from timm.data import auto_augment

    from data.pillow_compat import install

    install()
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.level_fn(10, op.hparams) == (0,)  # the argument Pillow >= 13 refuses
    assert list(op(img).getdata()) == [(0, 0, 0)] * 64
    op4 = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)  # keeps 2 bits: 200 -> 192, 100 -> 64
    assert list(op4(img).getdata())[0] == (192, 64, 0)
