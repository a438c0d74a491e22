"""Any channel count and bit depth: the shard writer keeps 16-bit PNG/TIFF pixels and `.npy` arrays of any channel
count exactly, records channels, dtype and per-channel mean/std in dataset.json (checked against a float64
computation here), the float transforms carry N channels and 16 bits through, and 1- and 4-channel pretraining runs
go end to end (the 4-channel encoder then probes with finetune/linprobe.py, its in_chans read from the weights)."""

from __future__ import annotations

import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from safetensors.torch import load_file

from data.decode import LoadPixels, decode_image
from data.make_shards import write_shards


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one): IHDR bit depth 16, colour type 2, filter 0 rows."""
    h, w, _ = arr.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def samples(folder: Path, split: str) -> list[dict]:
    """Every sample of a split's shards, in shard order, as {ext: bytes}."""
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return [out[k] for k in sorted(out)]


def test_16_bit_png_tiff_and_arrays_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    four8 = rng.integers(0, 256, (8, 4, 4), dtype=np.uint8)
    four16 = rng.integers(0, 65536, (5, 6, 4), dtype=np.uint16)
    floats = rng.standard_normal((4, 4, 2)).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(gray16).save(src / "a_gray16.png")  # PIL writes mode I;16 as a 16-bit PNG
    Image.fromarray(gray16).save(src / "b_gray16.tif")
    (src / "c_rgb16.png").write_bytes(png16_rgb(rgb16))
    for name, arr in (("d_four8.npy", four8), ("e_four16.npy", four16), ("f_floats.npy", floats)):
        np.save(src / name, arr)
    want = [gray16[..., None], gray16[..., None], rgb16, four8, four16, floats]  # [H, W, C], the sorted file order
    entry = write_shards(src, tmp_path / "out", shuffle=False, progress=False)
    assert entry["skipped"] == [] and entry["image_keys"] == {"png": 3, "npy": 3}
    got = [decode_image(s) for s in samples(tmp_path / "out", "train")]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.from_numpy(w).dtype and torch.equal(g, torch.from_numpy(w).permute(2, 0, 1))
    # the transforms' first stage: the dtype's maximum maps to 1.0, and one channel is repeated to the model's count
    x = LoadPixels(3)(got[0])
    assert x.shape == (3, 9, 7) and torch.equal(x[1], torch.from_numpy(gray16.astype(np.float32) / 65535.0))
    assert got[0].int().max() > 255  # 16 bits kept: convert("RGB") used to clip every value above 255 (pure white)
    with pytest.raises(ValueError, match="3 channels where the model takes 4"):
        LoadPixels(4)(got[2])


def test_dataset_json_channel_statistics_match_float64(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 65536, (6, 5, 4), dtype=np.uint16) for _ in range(3)]
    src = tmp_path / "src"
    src.mkdir()
    for i, arr in enumerate(arrays):
        np.save(src / f"{i}.npy", arr)
    entry = write_shards(src, tmp_path / "out", progress=False)
    pixels = np.concatenate([a.reshape(-1, 4).astype(np.float64) / 65535.0 for a in arrays])  # [N, 4]
    assert entry["channels"] == 4 and entry["dtype"] == "uint16"
    np.testing.assert_allclose(entry["mean"], pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(entry["std"], pixels.std(0), atol=1e-6)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]
    assert meta["mean"] == entry["mean"] and meta["channels"] == 4

    # 8-bit: grayscale and RGB images together make a 3-channel split, the gray ones counted in every channel
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(gray).save(mixed / "g.png")
    Image.fromarray(rgb).save(mixed / "r.png")
    entry = write_shards(mixed, tmp_path / "out8", progress=False)
    px = np.concatenate([np.repeat(gray.reshape(-1, 1), 3, 1), rgb.reshape(-1, 3)]).astype(np.float64) / 255.0
    assert entry["channels"] == 3 and entry["dtype"] == "uint8"
    np.testing.assert_allclose(entry["mean"], px.mean(0), atol=1e-6)
    np.testing.assert_allclose(entry["std"], px.std(0), atol=1e-6)


def test_16_bit_resize_keeps_the_dtype(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "big.npy", np.full((16, 24, 2), 40000, dtype=np.uint16))
    write_shards(src, tmp_path / "out", resize=8, progress=False)
    (got,) = [decode_image(s) for s in samples(tmp_path / "out", "train")]
    assert got.dtype == torch.uint16 and got.shape == (2, 8, 12) and bool((got.int() == 40000).all())


def make_dataset(root: Path, kind: str) -> Path:
    """Labelled train (24 images) and test (8) splits of 32 px images: 8-bit grayscale PNGs or 4-channel uint16
    arrays; the class shows in the brightness, so features can tell classes apart."""
    rng = np.random.default_rng(2)
    out = root / f"data_{kind}"
    for split, n in (("train", 24), ("test", 8)):
        folder = root / f"src_{kind}_{split}"
        items = []
        for i in range(n):
            label = i % 2
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "gray":
                arr = rng.integers(0, 128, (32, 32), dtype=np.uint8) + 100 * label
                path = folder / f"{i:03d}.png"
                Image.fromarray(arr.astype(np.uint8)).save(path)
            else:
                arr = rng.integers(0, 30000, (32, 32, 4), dtype=np.uint16) + 30000 * label
                path = folder / f"{i:03d}.npy"
                np.save(path, arr.astype(np.uint16))
            items.append((str(path), label))
        write_shards(items, out, split=split, shard_size=12, class_names=["dark", "bright"], progress=False)
    return out


@pytest.mark.parametrize("kind,chans", [("gray", 1), ("four", 4)])
def test_pretraining_with_1_and_4_channels(tmp_path, capsys, kind, chans):
    from pretrain import mae

    data = make_dataset(tmp_path, kind)
    meta = json.loads((data / "dataset.json").read_text())["splits"]["train"]
    assert meta["channels"] == chans
    run = tmp_path / "run"
    mae.main([*TINY_MODEL, f"data.train={data}", "data.micro_batch=8", "data.num_workers=0", f"run.output_dir={run}",
              "run.steps=3", "run.log_every=1", "run.save_every=0", "run.trackers=none", "run.progress=false",
              "run.precision=no", "optim.warmup_steps=1", "vis.num_images=2", "data.eval_batch=8"])
    enc = load_file(run / "encoder.safetensors")
    assert enc["patch_embed.proj.weight"].shape == (32, chans, 8, 8)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # step 0: baselines
    assert all(np.isfinite(r["loss"]) for r in records if r["step"] > 0) and 0.0 <= records[-1]["knn_top1"] <= 1.0
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())  # the run records what it resolved
    assert cfg["model"]["in_chans"] == chans and cfg["data"]["mean"] == meta["mean"]
    assert cfg["data"]["std"] == meta["std"]
    assert (run / "reconstructions.png").exists() == (chans == 1)  # grids draw 1- and 3-channel images
    if chans == 4:  # probing follows the encoder: 4 input channels read from its weights, dataset.json's statistics
        from finetune.linprobe import main as linprobe

        capsys.readouterr()
        probe = tmp_path / "probe"
        linprobe([f"data.train={data}", f"encoder={run / 'encoder.safetensors'}", f"run.output_dir={probe}",
                  "run.steps=2", "run.trackers=none", "run.progress=false", "data.num_workers=0",
                  "data.global_batch=8", "data.eval_batch=8", "optim.warmup_steps=1"])
        result = json.loads((probe / "eval.json").read_text())
        assert result["n_images"] == 8 and 0.0 <= result["top1"] <= 100.0  # percent


def test_downstream_encoders_take_in_chans_from_their_weights(tmp_path):
    import timm

    from launch.weights import read_weights
    from models.convert import save_encoder
    from models.vit import create_encoder

    ours = tmp_path / "encoder.safetensors"
    save_encoder(create_encoder(img_size=32, patch_size=8, in_chans=4, embed_dim=32, depth=2, num_heads=2).state_dict(),
                 ours)
    assert read_weights(str(ours), num_heads=2).encoder_cfg["in_chans"] == 4
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1)
    torch.save(vit.state_dict(), tmp_path / "timm_gray.pth")
    source = read_weights("timm:vit_tiny_patch16_224", weights=str(tmp_path / "timm_gray.pth"))
    assert source.encoder_cfg["in_chans"] == 1
    create_encoder(**source.encoder_cfg).load_state_dict(source.state_dict)  # builds and loads as a 1-channel ViT
