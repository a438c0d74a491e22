"""The shard writer at its limits (issue 26): per-image statistics without a full-size float64 copy of the image
(exact against an independent float64 computation, and the traced memory of one image well under that copy's size),
the image size recorded in dataset.json, and a full disk as one line naming the output and its free space, with no
partial shard left."""

from __future__ import annotations

import errno
import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import data.make_shards as make_shards
from data.make_shards import _with_stats, main, write_shards


def _sample(ext: str, data: bytes) -> dict:
    return {"index": 0, "path": f"x.{ext}", "label": -1, "ext": ext, "data": data, "size": (0, 0)}


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _reference(pixels: np.ndarray, top: float) -> tuple[list[float], list[float], int]:
    """Independent float64 statistics of [H, W, C] pixels in [0, 1] units."""
    x = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / top
    return x.sum(0).tolist(), (x * x).sum(0).tolist(), x.shape[0]


def _close(got: list[float], want: list[float]) -> bool:
    return all(abs(g - w) <= 1e-12 * abs(w) for g, w in zip(got, want, strict=True))


RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
GRAY8 = RNG.integers(0, 256, (29, 41), dtype=np.uint8)
U16 = RNG.integers(0, 65536, (23, 31, 4), dtype=np.uint16)
F32 = RNG.random((19, 27, 2), dtype=np.float32) * 3 - 1


@pytest.mark.parametrize("chunk", [1 << 22, 7])  # one chunk; one row per chunk
def test_statistics_match_an_independent_float64_computation(monkeypatch, chunk):
    """8-bit RGB (PNG and JPEG, as decoded), 8-bit grayscale (1 channel), 16-bit and float32 arrays; the tensor path
    in one chunk and in many."""
    monkeypatch.setattr(make_shards, "STATS_CHUNK", chunk)
    jpeg = _encoded(RGB8, "JPEG")
    cases = [
        ("png", _encoded(RGB8, "PNG"), RGB8, 255.0, "uint8"),
        ("jpg", jpeg, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), 255.0, "uint8"),
        ("png", _encoded(GRAY8, "PNG"), GRAY8[..., None], 255.0, "uint8"),
        ("npy", _npy(U16), U16, 65535.0, "uint16"),
        ("npy", _npy(F32), F32, 1.0, "float32"),
    ]
    for ext, data, pixels, top, dtype in cases:
        channels, got_dtype, sums, squares, n = _with_stats(_sample(ext, data))["stats"]
        want_sums, want_squares, want_n = _reference(pixels, top)
        assert (channels, got_dtype, n) == (pixels.shape[-1], dtype, want_n), ext
        assert _close(sums, want_sums) and _close(squares, want_squares), (ext, dtype, sums, want_sums)


def test_statistics_of_one_image_take_far_less_memory_than_a_float64_copy():
    """The traced allocations (numpy's included) while computing one 8-bit image's statistics stay under a tenth of
    a float64 copy of the image (12 MiB for this 1024 x 512 RGB PNG); the whole-image float64 computation took
    more than twice that copy (the copy and its square)."""
    arr = np.tile(np.arange(256, dtype=np.uint8), (1024, 2))[..., None].repeat(3, axis=2)  # [1024, 512, 3]
    sample = _sample("png", _encoded(arr, "PNG"))
    float64_copy = arr.size * 8
    tracemalloc.start()
    try:
        _with_stats(sample)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < float64_copy / 10, f"peak {peak / 2**20:.1f} MiB, a float64 copy is {float64_copy / 2**20:.1f} MiB"


def test_dataset_json_records_one_image_size_or_none(tmp_path):
    for name, sizes, want in (("same", [(12, 10), (12, 10)], [10, 12]), ("mixed", [(12, 10), (10, 12)], None)):
        src = tmp_path / name
        src.mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (i * 50, 3, 9)).save(src / f"{i}.png")
        write_shards(src, tmp_path / f"out-{name}", workers=1, progress=False)
        entry = json.loads((tmp_path / f"out-{name}" / "dataset.json").read_text())["splits"]["train"]
        assert entry["image_size"] == want


def test_full_disk_is_one_line_naming_the_output_and_no_partial_shard_is_left(tmp_path, monkeypatch, capsys):
    """ENOSPC from the shard file's write on the second image (the first is in the partial shard by then): exit 2,
    one line naming the output folder and its free space, and nothing left in the output folder."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 7, 9)).save(src / f"{i}.jpg")
    real_addfile = tarfile.TarFile.addfile
    written = []

    def addfile(self, tarinfo, fileobj=None, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tarinfo.name)
        return real_addfile(self, tarinfo, fileobj, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--input", str(src), "--output", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and written, err
    last = err.strip().splitlines()[-1]  # (above it: the progress bar)
    assert last.startswith("data/make_shards.py: error: the disk is full") and str(out) in last, last
    assert " free there now" in last and "Traceback" not in err
    assert [p.name for p in out.rglob("*")] == []
