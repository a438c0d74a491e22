"""Hybrid ViTs (models/hybrid.py): the conv stem's and the hybrids' feature shapes, training from scratch through
finetune/classify.py with the export reloaded in timm (identical outputs), fine-tuning from that export, the probe's
rebuild of a hybrid encoder, the errors for weights that do not fit, and the MAE-pretraining refusal."""

from __future__ import annotations

import pytest
import torch
from conftest import N_TEST

FT = ["run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8", "data.eval_batch=4",
      "run.log_every=2", "optim.warmup_steps=1", "run.eval_every=0", "run.save_every=0"]
TEST_HYBRID = "test_vit_convstem_p4_32"


def test_conv_stem_and_hybrid_feature_shapes():
    from models.hybrid import conv_stem, create_hybrid, hybrid_encoder_cfg

    x = torch.randn(2, 3, 32, 32)
    assert conv_stem(3, 32, 4)(x).shape == (2, 32, 8, 8)  # total stride 4 = a patch-4 ViT's grid
    assert conv_stem(3, 48, 8)(x).shape == (2, 48, 4, 4)
    with pytest.raises(ValueError, match="power of 2"):
        conv_stem(3, 32, 3)
    cfg = hybrid_encoder_cfg(TEST_HYBRID)
    assert cfg == {"hybrid": TEST_HYBRID, "img_size": 32, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2,
                   "mlp_ratio": 2.0, "stride": 4}
    enc = create_hybrid(cfg).eval()
    assert enc.patch_embed(x).shape == (2, 64, 32)  # 8x8 tokens from the stem's last 1x1 conv, no extra projection
    assert enc.forward_features(x).shape == (2, 1 + 64, 32) and enc(x).shape == (2, 32)  # CLS + patches; headless
    # timm's own ResNet hybrid (ResNetV2 stem + patch 8), made small: the grid follows its total stride
    r_cfg = {**hybrid_encoder_cfg("timm:vit_tiny_r_s16_p8_224", img_size=64), "embed_dim": 32, "depth": 1,
             "num_heads": 2}
    assert r_cfg["hybrid"] == "vit_tiny_r_s16_p8_224" and r_cfg["stride"] == 32
    r = create_hybrid(r_cfg, num_classes=5).eval()
    assert r.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 1 + (64 // 32) ** 2, 32)
    with pytest.raises(ValueError, match="no distilled form"):
        create_hybrid(r_cfg, num_classes=5, distilled=True)


def test_hybrid_from_scratch_exports_to_timm_and_fine_tunes(tiny):
    import timm
    from conftest import load_classifier

    from finetune.classify import main

    run = tiny["base"] / "scratch"
    out = main([f"data.train={tiny['data']}", "encoder=random", f"arch={TEST_HYBRID}", f"run.output_dir={run}",
                "run.steps=3", *FT])
    assert out["n_images"] == N_TEST and out["arch"] == TEST_HYBRID
    model, meta = load_classifier(run)
    assert meta["kind"] == "vit" and meta["encoder_cfg"]["hybrid"] == TEST_HYBRID
    bn = model.patch_embed.backbone[0].bn
    assert bn.num_batches_tracked.item() == 3 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    t = meta["timm"]
    path = str(run / "classifier_last.safetensors")
    reloaded = timm.create_model(t["name"], pretrained=True, **t["kwargs"],
                                 pretrained_cfg_overlay=dict(file=path, num_classes=meta["num_classes"])).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))  # stem BatchNorm statistics included

    run2 = tiny["base"] / "from_export"
    main([f"data.train={tiny['data']}", f"encoder={path}", f"arch={TEST_HYBRID}", f"run.output_dir={run2}",
          "run.steps=1", "optim.blr=1e-12", *FT])
    tuned, _ = load_classifier(run2)
    start = load_classifier(run)[0].state_dict()
    torch.testing.assert_close(tuned.patch_embed.backbone[1].conv.weight, start["patch_embed.backbone.1.conv.weight"])


def test_probe_rebuilds_a_hybrid_encoder(tmp_path):
    from conftest import load_classifier

    from finetune.export import save_classifier
    from models.classifier import create_backbone
    from models.hybrid import hybrid_encoder_cfg
    from models.probe import ProbeClassifier

    cfg = hybrid_encoder_cfg(TEST_HYBRID)
    probe = ProbeClassifier(create_backbone(cfg), 3, pool="avg")
    x = torch.randn(2, 3, 32, 32)
    assert probe.features(x).shape == (2, 32) and probe(x).shape == (2, 3)
    meta = {"kind": "probe", "encoder_cfg": cfg, "num_classes": 3, "pool": "avg", "img_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "crop_pct": 1.0}
    save_classifier(probe.state_dict(), tmp_path / "classifier_last.safetensors", meta)
    again, _ = load_classifier(tmp_path)
    probe.eval()
    torch.testing.assert_close(again(x), probe(x))


def test_hybrid_errors(tiny, tmp_path):
    from core.errors import UserError as ConfigError  # config and weights problems alike
    from launch.weights import read_weights
    from models.classifier import create_backbone
    from models.convert import save_encoder
    from models.hybrid import hybrid_encoder_cfg

    with pytest.raises(ConfigError, match=f"does not fit arch {TEST_HYBRID}.*patch_embed.backbone"):
        read_weights(str(tiny["encoder"]), arch=TEST_HYBRID)  # a plain ViT encoder for a hybrid
    hybrid_file = save_encoder(create_backbone(hybrid_encoder_cfg(TEST_HYBRID)).state_dict(),
                               tmp_path / "hybrid.safetensors")
    with pytest.raises(ConfigError, match="holds a hybrid ViT"):
        read_weights(str(hybrid_file))  # without arch= its architecture is unknown
    assert read_weights(str(hybrid_file), arch=f"timm:{TEST_HYBRID}").encoder_cfg["hybrid"] == TEST_HYBRID
    with pytest.raises(ConfigError, match="CNNs train from scratch"):
        read_weights(str(tiny["encoder"]), arch="timm:test_resnet")
    with pytest.raises(ConfigError, match="neither an MAE variant"):
        read_weights("random", arch="vit_nonexistent_convstem")


def test_mae_pretraining_refuses_hybrids(tmp_path, capsys):
    from models.hybrid import pretraining_refusal
    from pretrain.mae import main

    with pytest.raises(SystemExit) as info:  # as a user runs it: one line, exit 2, before anything is built
        main([f"model.name={TEST_HYBRID}", "model.objective=simmim", f"run.output_dir={tmp_path}", "run.steps=1"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("pretrain/mae.py: error:") and "is a hybrid ViT" in err
    assert len(err.splitlines()) == 1 and not any(tmp_path.iterdir())

    for name in (TEST_HYBRID, "vit_tiny_convstem_p4_32", "timm:vit_small_r26_s32_224"):
        why = pretraining_refusal(name)
        assert why.startswith(f"model.name={name} is a hybrid ViT") and "receptive fields" in why
    assert pretraining_refusal("mae_vit_tiny_patch4_dec128d2b") is None
    assert pretraining_refusal("timm:vit_tiny_patch16_224") is None
