"""Linear probing: LARS set-up vs a float64 MoCo-v3 reference, the probe model, the feature cache, end-to-end runs
(cached and augmented paths, 1 and 2 processes) on tiny uneven shards, and the bad-input errors.

The tiny-dataset / tiny-encoder helpers and the 2-process launcher here are also used by test_finetune.py and
test_evaluate.py (`from test_linprobe import ...`; no shared helper module exists in tests/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY_ENC = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
CLASSES = ["airplane", "automobile", "bird"]
N_TRAIN, N_TEST = 30, 13  # test shards of 5/5/3 images: uneven over 2 ranks


def _sample_items(split: str, per_class: int, offset: int = 0) -> list[tuple[str, int]]:
    """(file, label) for images of the first classes, taken from the shipped sample's shards (real CIFAR JPEGs)."""
    dest = Path(tempfile.mkdtemp(prefix=f"tessera-sample-{split}-"))
    by_class: dict[int, list[str]] = {label: [] for label in range(len(CLASSES))}
    for shard in sorted(SAMPLE.glob(f"{split}-*.tar.gz")):
        with tarfile.open(shard) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(samples):
            label = int(samples[key]["cls"])
            if label in by_class and len(by_class[label]) < offset + per_class:
                path = dest / f"{key}.jpg"
                path.write_bytes(samples[key]["jpg"])
                by_class[label].append(str(path))
    return [(f, label) for label in by_class for f in by_class[label][offset: offset + per_class]]


def make_tiny_dataset(out: Path) -> Path:
    """`out/dataset.json` with train (30 images, 3 shards), test (13 images, 5/5/3) and `nolabels` (unlabelled)."""
    from data.make_shards import write_shards

    train = _sample_items("train", N_TRAIN // 3)
    test = _sample_items("test", 5)[:N_TEST]
    write_shards(train, out, split="train", shard_size=10, shuffle=True, class_names=CLASSES, progress=False)
    write_shards(test, out, split="test", shard_size=5, shuffle=False, class_names=CLASSES, progress=False)
    write_shards([(p, -1) for p, _ in test[:6]], out, split="nolabels", shard_size=3, shuffle=False, progress=False)
    return out


def make_tiny_encoder(out: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random-weight encoder saved as our encoder.safetensors (encoder_cfg in the metadata)."""
    from models.convert import save_encoder
    from models.vit import create_encoder

    torch.manual_seed(seed)
    cfg = {**TINY_ENC, **overrides}
    enc = create_encoder(**cfg)
    return save_encoder(enc.state_dict(), out, encoder_cfg=cfg)


COMMON = ["run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8",
          "data.eval_batch_size=4", "run.log_every=2"]


def launch_two(script: str, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` (python source) under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)."""
    path = tmp / "driver.py"
    # Several entry-point mains share one launched process (saves a launch, ~10 s, each); `end_training` at the end
    # of a main destroys the process group, so the driver keeps it for the next main and tears it down at exit.
    path.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                    "import launch.metrics as _m\n"
                    "_m.MetricsLogger.close = lambda self: [t.finish() for t in self.accelerator.trackers]\n"
                    + script
                    # a clean teardown: exiting with a live gloo group lets one rank abort (SIGABRT) at exit
                    + "\nimport torch.distributed as _dist\nif _dist.is_initialized():\n"
                      "    _dist.barrier()\n    _dist.destroy_process_group()\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    return {"data": make_tiny_dataset(base / "data"),
            "encoder": make_tiny_encoder(base / "enc" / "encoder.safetensors"), "base": base}


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
    from finetune.probe import ProbeHead, build_lars

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
    from finetune.probe import ProbeClassifier
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
    from finetune.features import encode
    from finetune.linprobe import main

    run = tiny["base"] / "cached"
    args = [f"data.path={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={run}", "run.steps=12",
            "optim.warmup_steps=2", *COMMON]
    out = main(args)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and ev["path"] == "cached" and out["top1"] == ev["top1"]
    assert ev["peak_lr"] == pytest.approx(0.1 * 8 / 256) and ev["global_batch"] == 8  # blr * batch / 256
    assert 0 <= ev["top1"] <= ev["top5"] <= 100 and ev["encoder"]["identity"].startswith("sha256:")
    blob = torch.load(run / "features" / "train.pt", weights_only=True)
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
    test_blob = torch.load(run / "features" / "test.pt", weights_only=True)
    from data.info import resolve
    from finetune.splits import norm_stats

    mean, std = norm_stats(None, None, resolve(f"{tiny['data']}:train"))  # dataset.json's, as the probe takes them
    loader = build_eval_loader(f"{tiny['data']}:test", batch_size=13,
                               transform=eval_transform(32, mean, std, crop_pct=1.0))  # the float path, on the CPU
    batch = next(iter(loader))
    with torch.no_grad():
        direct = encode(enc, batch["image"], "token")[batch["valid"]]
    torch.testing.assert_close(test_blob["features"], direct, rtol=1e-5, atol=1e-5)
    assert (run / "classifier_best.safetensors").is_file() and (run / "classifier_last.safetensors").is_file()
    assert json.loads((run / "classifier.json").read_text())["kind"] == "probe"
    mtime = (run / "features" / "train.pt").stat().st_mtime_ns
    capsys.readouterr()
    main(args + ["run.resume=false", "run.overwrite=true"])
    assert "using cached train features" in capsys.readouterr().out
    assert (run / "features" / "train.pt").stat().st_mtime_ns == mtime
    # another encoder file at the same path: a stale cache, rebuilt
    other = make_tiny_encoder(tiny["base"] / "enc2" / "encoder.safetensors", seed=1)
    main([*args[:1], f"encoder={other}", *args[2:], "run.resume=false", "run.overwrite=true"])
    assert "extracted 30 train features" in capsys.readouterr().out


def test_linprobe_augmented_path_and_random_baseline(tiny):
    from finetune.linprobe import main

    run = tiny["base"] / "aug"
    main([f"data.path={tiny['data']}", "encoder=random", "arch=mae_vit_tiny_patch4_dec128d2b",
          f"run.output_dir={run}", "run.steps=3", "optim.warmup_steps=1", "probe.cached=false",
          "pool=avg", *COMMON])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_images"] == N_TEST and ev["path"] == "augmented" and ev["pool"] == "avg"
    assert ev["encoder"]["spec"] == "random" and not (run / "features").exists()


@pytest.mark.slow
def test_two_processes_cached_and_augmented(tiny, tmp_path):
    runs = {p: tmp_path / p for p in ("cached", "augmented")}
    common = [f"data.path={tiny['data']}", f"encoder={tiny['encoder']}", "run.steps=4", "optim.warmup_steps=1",
              *COMMON]
    calls = [common + [f"run.output_dir={run}", f"probe.cached={p == 'cached'}"] for p, run in runs.items()]
    script = "from finetune.linprobe import main\n" + "".join(f"main({c!r})\n" for c in calls)
    launch_two(script, tmp_path)
    for p, run in runs.items():
        ev = json.loads((run / "eval.json").read_text())
        assert ev["world_size"] == 2 and ev["path"] == p
        assert ev["n_images"] == N_TEST  # every test image exactly once over 2 ranks with uneven shards
    feats = torch.load(runs["cached"] / "features" / "test.pt", weights_only=True)
    assert feats["features"].shape[0] == N_TEST
    assert sorted(feats["labels"].tolist()) == sorted(y for _, y in _sample_items("test", 5)[:N_TEST])


# ------------------------------------------------------------------------------------------------ bad input


def _bad(tiny, *extra):
    from finetune.linprobe import main
    from launch.config import ConfigError

    with pytest.raises((ConfigError, SystemExit)) as info:
        main([f"data.path={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tiny['base'] / 'bad'}",
              "run.steps=1", *COMMON, *extra])
    return str(info.value)


def test_bad_inputs_fail_before_training(tiny):
    assert "encoder file not found" in _bad(tiny, f"encoder={tiny['base'] / 'nope.safetensors'}")
    msg = _bad(tiny, "num_classes=7")
    assert "num_classes=7" in msg and "3 classes" in msg
    msg = _bad(tiny, "data.train_split=nolabels")
    assert "nolabels" in msg and "no labels" in msg
    msg = _bad(tiny, "arch=mae_vit_tiny_patch4_dec128d2b")  # 192 wide, depth 12, patch 4 vs the 32-wide file
    assert "does not fit" in msg and "embed_dim" in msg and "depth" in msg and "patch_size" in msg
    assert "needs arch=" in _bad(tiny, "encoder=random")
    assert not (tiny["base"] / "bad" / "eval.json").exists()


# ------------------------------------------------------------------------------------------------ encoder sources


def test_encoder_sources_official_pth_and_timm(tiny, tmp_path):
    from finetune.encoder_source import resolve_encoder
    from launch.config import ConfigError
    from models.convert import load_state_dict
    from models.vit import create_encoder

    ours = load_state_dict(str(tiny["encoder"]))
    # an official-style full MAE checkpoint: {"model": encoder + decoder keys}, no metadata, no config.yaml
    full = {**ours, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
            "decoder_embed.bias": torch.zeros(16)}
    torch.save({"model": full, "epoch": 3}, tmp_path / "mae_pretrain_full.pth")
    src = resolve_encoder(str(tmp_path / "mae_pretrain_full.pth"))
    assert set(src.state_dict) == set(ours) and torch.equal(src.state_dict["pos_embed"], ours["pos_embed"])
    assert src.encoder_cfg["num_heads"] == 1 and src.notes  # 32 wide: dim/64 -> 1 head, with a note saying so
    assert resolve_encoder(str(tmp_path / "mae_pretrain_full.pth"), num_heads=2).encoder_cfg == {**TINY_ENC,
                                                                                                 "num_heads": 2}
    # timm:NAME with local weights (no downloads)
    torch.manual_seed(0)
    vit = create_encoder(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    torch.save(vit.state_dict(), tmp_path / "tiny224.pth")
    src = resolve_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "tiny224.pth"))
    assert src.encoder_cfg == {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 192, "depth": 12,
                               "num_heads": 3, "mlp_ratio": 4.0}
    with pytest.raises(ConfigError, match="needs encoder_weights"):
        resolve_encoder("timm:vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="does not fit.*embed_dim: model 384 vs checkpoint 192"):
        resolve_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "tiny224.pth"))


def test_linprobe_cached_resume_is_exact(tiny):
    from safetensors.torch import load_file

    from finetune.linprobe import main

    run = tiny["base"] / "resume"
    args = [f"data.path={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={run}", "run.steps=6",
            "run.save_every=3", "optim.warmup_steps=1", "optim.grad_accum_steps=2", *COMMON]
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
