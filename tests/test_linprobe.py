"""Linear probing: LARS set-up vs a float64 MoCo-v3 reference, the probe model, the feature cache, end-to-end runs
(cached and augmented paths, 1 and 2 processes) on tiny uneven shards, and the bad-input errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DOWNSTREAM, N_TEST, N_TRAIN, TINY_ENC, _sample_items, make_tiny_encoder
from helpers_launch import ROOT, launch_two
from safetensors.torch import load_file

# ------------------------------------------------------------------------------------------------ units


def _mocov3_lars_step(params, grads, bufs, lr, momentum=0.9, trust=1e-3):
    """Independent float64 reference of MoCo v3's LARS (as used by the MAE probe), weight decay 0."""
    out = []
    for p, g, b in zip(params, grads, bufs):
        dp = g.clone()
        if p.ndim > 1:
            pn, un = p.norm(), dp.norm()
            q = trust * pn / un if (pn > 0 and un > 0) else torch.tensor(1.0, dtype=p.dtype)
            dp = dp * q
        b.mul_(momentum).add_(dp)
        out.append(p - lr * b)
    return out


def test_lars_matches_mocov3_reference():
    from finetune.probe_optim import build_lars
    from models.probe import ProbeHead

    torch.manual_seed(0)
    head = ProbeHead(6, 4).double()
    opt = build_lars(head, lr=0.5, momentum=0.9)
    ref = [p.detach().clone() for p in head.parameters()]
    bufs = [torch.zeros_like(p) for p in ref]
    for _ in range(3):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        grads = [p.grad.detach().clone() for p in head.parameters()]
        ref = _mocov3_lars_step(ref, grads, bufs, lr=0.5)
        opt.step()
        for p, r in zip(head.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


def test_probe_model_frozen_encoder_and_head_init():
    from models.probe import ProbeClassifier
    from models.vit import create_encoder

    torch.manual_seed(0)
    model = ProbeClassifier(create_encoder(**TINY_ENC), 5, pool="avg")
    bn, lin = model.head[0], model.head[1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert lin.weight.std().item() == pytest.approx(0.01, rel=0.3)  # timm trunc_normal_, cut at +-2 (absolute), as MAE
    assert torch.equal(lin.bias, torch.zeros(5))
    model.train()
    assert not model.encoder.training and model.head.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    x = torch.randn(4, 3, 32, 32)
    tokens = model.encoder.forward_features(x)  # [4, 1+16, 32]
    torch.testing.assert_close(model.features(x), tokens[:, 1:].mean(1))
    model(x).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters()) and lin.weight.grad is not None


def test_feature_gather_single_process_and_cache_key(tmp_path):
    from finetune.features import FeatureCache, cache_key

    cache = FeatureCache(tmp_path)
    f, y = torch.randn(7, 3), torch.arange(7)
    k1 = cache_key(encoder_identity="sha256:a", urls=[], transform="T", pool="token")
    cache.save("train", k1, f, y)
    got = cache.load("train", k1)
    assert got is not None and torch.equal(got[0], f) and torch.equal(got[1], y)
    assert cache.load("train", cache_key(encoder_identity="sha256:b", urls=[], transform="T", pool="token")) is None
    assert cache.load("train", cache_key(encoder_identity="sha256:a", urls=[], transform="U", pool="token")) is None


# ------------------------------------------------------------------------------------------------ end to end


def test_linprobe_cached_end_to_end_and_cache_reuse(tiny, capsys):
    from finetune.linprobe import main
    from models.pooling import encode

    run = tiny["base"] / "cached"
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={run}", "run.steps=12",
            "optim.warmup_steps=2", *DOWNSTREAM]
    out = main(args)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and ev["path"] == "cached" and out["top1"] == ev["top1"]
    assert ev["peak_lr"] == pytest.approx(0.1 * 8 / 256) and ev["global_batch"] == 8  # blr * batch / 256
    assert 0 <= ev["top1"] <= ev["top5"] <= 100 and ev["encoder"]["identity"].startswith("sha256:")
    blob = load_file(str(run / "features" / "train.safetensors"))
    assert blob["features"].shape == (N_TRAIN, TINY_ENC["embed_dim"])
    assert sorted(blob["labels"].tolist()) == sorted([i // 10 for i in range(N_TRAIN)])
    # cached features equal a direct forward of the eval-transformed images (independent pass)
    from data.eval_stream import build_eval_loader
    from data.transforms import eval_transform
    from models.convert import load_state_dict
    from models.vit import create_encoder

    enc = create_encoder(**TINY_ENC)
    enc.load_state_dict(load_state_dict(str(tiny["encoder"])))
    enc.eval()
    test_blob = load_file(str(run / "features" / "test.safetensors"))
    from data.info import resolve
    from data.norm_stats import norm_stats

    mean, std, _ = norm_stats(None, None, resolve(f"{tiny['data']}:train").meta)  # dataset.json's, as the probe
    loader = build_eval_loader(f"{tiny['data']}:test", batch_size=13,
                               transform=eval_transform(32, mean, std, crop_pct=1.0))  # the float path, on the CPU
    batch = next(iter(loader))
    with torch.no_grad():
        direct = encode(enc, batch["image"], "token")[batch["valid"]]
    torch.testing.assert_close(test_blob["features"], direct, rtol=1e-5, atol=1e-5)
    assert (run / "classifier_best.safetensors").is_file() and (run / "classifier_last.safetensors").is_file()
    assert json.loads((run / "classifier.json").read_text())["kind"] == "probe"
    mtime = (run / "features" / "train.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    main(args + ["run.resume=false", "run.overwrite=true"])
    assert "using cached train features" in capsys.readouterr().out
    assert (run / "features" / "train.safetensors").stat().st_mtime_ns == mtime
    # another encoder file at the same path: a stale cache, rebuilt
    other = make_tiny_encoder(tiny["base"] / "enc2" / "encoder.safetensors", seed=1)
    main([*args[:1], f"encoder={other}", *args[2:], "run.resume=false", "run.overwrite=true"])
    assert "extracted 30 train features" in capsys.readouterr().out


def test_linprobe_augmented_path_and_random_baseline(tiny):
    from finetune.linprobe import main

    run = tiny["base"] / "aug"
    main([f"data.train={tiny['data']}", "encoder=random", "arch=mae_vit_tiny_patch4_dec128d2b",
          f"run.output_dir={run}", "run.steps=3", "optim.warmup_steps=1", "probe.cached=false",
          "model.pool=avg", *DOWNSTREAM])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and ev["path"] == "augmented" and ev["pool"] == "avg"
    assert ev["encoder"]["spec"] == "random" and not (run / "features").exists()


@pytest.mark.slow
def test_two_processes_cached_and_augmented(tiny, tmp_path):
    runs = {p: tmp_path / p for p in ("cached", "augmented")}
    common = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", "run.steps=4", "optim.warmup_steps=1",
              *DOWNSTREAM]
    calls = [common + [f"run.output_dir={run}", f"probe.cached={p == 'cached'}"] for p, run in runs.items()]
    script = "from finetune.linprobe import main\n" + "".join(f"main({c!r})\n" for c in calls)
    launch_two(script, tmp_path)
    for p, run in runs.items():
        ev = json.loads((run / "eval.json").read_text())
        assert ev["world_size"] == 2 and ev["path"] == p
        assert ev["n_images"] == N_TEST  # every test image exactly once over 2 ranks with uneven shards
    feats = load_file(str(runs["cached"] / "features" / "test.safetensors"))
    assert feats["features"].shape[0] == N_TEST
    assert sorted(feats["labels"].tolist()) == sorted(y for _, y in _sample_items("test", 5)[:N_TEST])


# ------------------------------------------------------------------------------------------------ bad input


def _bad(tiny, *extra):
    from core.errors import UserError
    from finetune.linprobe import main

    with pytest.raises((UserError, SystemExit)) as info:
        main([f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tiny['base'] / 'bad'}",
              "run.steps=1", *DOWNSTREAM, *extra])
    return str(info.value)


def test_bad_inputs_fail_before_training(tiny):
    assert "no such file or directory" in _bad(tiny, f"encoder={tiny['base'] / 'nope.safetensors'}")
    msg = _bad(tiny, "num_classes=7")
    assert "num_classes=7" in msg and "3 classes" in msg
    msg = _bad(tiny, f"data.train={tiny['data']}:nolabels")
    assert "nolabels" in msg and "no labels" in msg
    msg = _bad(tiny, "arch=mae_vit_tiny_patch4_dec128d2b")  # 192 wide, depth 12, patch 4 vs the 32-wide file
    assert "does not fit" in msg and "embed_dim" in msg and "depth" in msg and "patch_size" in msg
    assert "needs arch=" in _bad(tiny, "encoder=random")
    assert not (tiny["base"] / "bad" / "eval.json").exists()


def test_linprobe_cached_resume_is_exact(tiny):
    from finetune.linprobe import main

    run = tiny["base"] / "resume"
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={run}", "run.steps=6",
            "run.save_every=3", "optim.warmup_steps=1", "optim.grad_accum_steps=2", *DOWNSTREAM]
    main(args)
    full = load_file(str(run / "classifier_last.safetensors"))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000003", "step_000006"]
    shutil.rmtree(run / "checkpoints" / "step_000006")  # as if killed after step 3's checkpoint
    main(args)  # resumes at step 3: steps 4-6 again
    resumed = load_file(str(run / "classifier_last.safetensors"))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-7, msg=k)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(2) == 1 and steps.count(6) == 2  # truncated after step 3, then logged again (loss + test)


def test_attentive_probe_cached_and_streamed_and_raw_pixels(tiny):
    """probe.head=attentive through the documented file (finetune/configs/probe_attentive.yaml): cached fp16 tokens
    when they fit probe.token_memory, streamed otherwise; the saved classifier reloads as an attentive probe. Raw
    pixels (encoder=pixels) are the yardstick of both heads: the linear probe's cached features are the images
    average-pooled to 8x8, computed here independently."""
    import torch.nn.functional as F
    from conftest import load_classifier

    from finetune.linprobe import main
    from models.probe import AttentiveProbeClassifier

    recipe = str(ROOT / "finetune" / "configs" / "probe_attentive.yaml")
    common = [f"data.train={tiny['data']}", *DOWNSTREAM, "run.steps=4", "optim.warmup_steps=1"]
    cached, streamed = tiny["base"] / "att", tiny["base"] / "att_stream"
    main([recipe, f"encoder={tiny['encoder']}", *common, f"run.output_dir={cached}"])
    main([recipe, f"encoder={tiny['encoder']}", *common, f"run.output_dir={streamed}", "probe.token_memory=1e-12"])
    for run, path in ((cached, "cached"), (streamed, "augmented")):
        ev = json.loads((run / "eval.json").read_text())
        assert ev["head"] == "attentive" and ev["path"] == path and ev["n_images"] == N_TEST
    tokens = load_file(str(cached / "features" / "train.tokens.safetensors"))
    assert tokens["features"].shape == (N_TRAIN, 16, TINY_ENC["embed_dim"]) and tokens["features"].dtype == \
        torch.float16  # the 16 patch tokens of each image, fp16
    model, meta = load_classifier(cached)
    assert isinstance(model, AttentiveProbeClassifier) and meta["head"] == "attentive"
    arch = "arch=mae_vit_tiny_patch4_dec128d2b"
    pixels = tiny["base"] / "pixels"
    main(["encoder=pixels", arch, *common, f"run.output_dir={pixels}"])
    main([recipe, "encoder=pixels", arch, *common, f"run.output_dir={tiny['base'] / 'pixels_att'}"])
    feats = load_file(str(pixels / "features" / "test.safetensors"))["features"]
    from data.eval_stream import build_eval_loader
    from data.info import resolve
    from data.norm_stats import norm_stats
    from data.transforms import eval_transform

    mean, std, _ = norm_stats(None, None, resolve(f"{tiny['data']}:train").meta)
    batch = next(iter(build_eval_loader(f"{tiny['data']}:test", batch_size=N_TEST,
                                        transform=eval_transform(32, mean, std, crop_pct=1.0))))
    images = batch["image"][batch["valid"]].double()  # [13, 3, 32, 32]
    direct = images.reshape(N_TEST, 3, 8, 4, 8, 4).mean(dim=(3, 5)).flatten(1)  # 4x4 cells: the 8x8 average pool
    torch.testing.assert_close(feats.double(), direct, rtol=1e-5, atol=1e-5)
    assert F.cosine_similarity(feats[:1].double(), direct[:1]).item() > 0.99999
