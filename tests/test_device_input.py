"""uint8 input on the device: normalisation against the CPU float path and float64, device_batches (CPU here; the
side-stream prefetch when CUDA is present), exact resume of the shard stream with the uint8 transforms, the
device-resident small-dataset loader, and batched random erasing."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from data.device_dataset import DeviceTrainLoader, build_device_loader, crop_boxes, resized_crops
from data.device_erasing import DeviceRandomErasing, erasing_generator
from data.device_input import device_batches, normalize_on_device
from data.seeding import mix_seed
from data.train_stream import build_train_loader
from data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

SAMPLE = "data/sample"
CUDA = torch.cuda.is_available()


def _uint8_batch(n=4, h=24, w=20, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def test_device_normalisation_equals_cpu_float_path_and_float64():
    x = _uint8_batch()
    out = normalize_on_device(x, IMAGENET_MEAN, IMAGENET_STD)
    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # the float path of the workers
    ref = torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in x])
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out - ref).abs().max() <= 1e-6
    f64 = (x.double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    assert (out.double() - f64).abs().max() <= 1e-6
    half = normalize_on_device(x, IMAGENET_MEAN, IMAGENET_STD, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.to(torch.bfloat16))  # float32 first, then cast
    with pytest.raises(TypeError, match="uint8"):
        normalize_on_device(out, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="channels"):
        normalize_on_device(x[:, :2], IMAGENET_MEAN, IMAGENET_STD)


def test_device_batches_moves_normalises_and_passes_the_rest():
    x = _uint8_batch(seed=1)
    already = torch.randn(4, 3, 8, 8)
    loader = [{"image": x, "label": torch.arange(4), "valid": torch.ones(4, dtype=torch.bool), "n_corrupt": 2,
               "key": ["a", "b", "c", "d"]},
              {"image": already, "label": torch.arange(4)}]
    out = list(device_batches(loader, "cpu", mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype=torch.bfloat16))
    assert len(out) == 2
    assert torch.equal(out[0]["image"], normalize_on_device(x, CIFAR10_MEAN, CIFAR10_STD, torch.bfloat16))
    assert out[0]["n_corrupt"] == 2 and out[0]["key"] == ["a", "b", "c", "d"]
    assert torch.equal(out[0]["label"], torch.arange(4)) and out[0]["valid"].dtype == torch.bool
    assert torch.equal(out[1]["image"], already.to(torch.bfloat16))  # floating: taken as normalised, only cast
    with pytest.raises(ValueError, match="prefetch"):
        next(device_batches(loader, "cpu", mean=CIFAR10_MEAN, std=CIFAR10_STD, prefetch=-1))


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the side-stream prefetch")
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_cuda_prefetch_gives_the_cpu_result(prefetch):
    batches = [{"image": _uint8_batch(8, 32, 32, seed=s), "label": torch.arange(8) + s} for s in range(5)]
    got = []
    for b in device_batches(iter(batches), "cuda", mean=IMAGENET_MEAN, std=IMAGENET_STD, prefetch=prefetch):
        assert b["image"].is_cuda and b["label"].is_cuda
        got.append((b["image"] * 2).sum(dim=(1, 2, 3)).cpu())  # work on the compute stream
    want = [(normalize_on_device(b["image"], IMAGENET_MEAN, IMAGENET_STD) * 2).sum(dim=(1, 2, 3)) for b in batches]
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-3) for g, w in zip(got, want))

    def made_on_gpu():  # a device-resident loader: batches computed on the compute stream just before use
        for b in batches:
            big = torch.randn(2048, 2048, device="cuda")
            for _ in range(20):
                big = big @ big / 2048  # keep the compute stream busy, so a missing wait would read early
            yield {"image": (b["image"].cuda().int() + (big.sum() * 0).int()).to(torch.uint8)}

    for b, w in zip(device_batches(made_on_gpu(), "cuda", mean=IMAGENET_MEAN, std=IMAGENET_STD, prefetch=prefetch),
                    want):
        assert torch.allclose((b["image"] * 2).sum(dim=(1, 2, 3)).cpu(), w, rtol=1e-5, atol=1e-3)


def _photo_shards(folder, n=12, seed=0) -> str:
    """A few 300-700 px JPEG shards with detail (so crops decode at full and at reduced scale)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for k in range(3):
        with wds.TarWriter(str(folder / f"train-{k:06d}.tar"), encoder=False) as tw:
            for i in range(n // 3):
                h, w = rng.integers(300, 700, 2)
                coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                a = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.Resampling.BICUBIC), float)
                buf = io.BytesIO()
                Image.fromarray(np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG")
                tw.write({"__key__": f"k{k}_{i}", "jpg": buf.getvalue(), "cls": str(i % 3).encode()})
    return str(folder / "train-{000000..000002}.tar")


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_with_uint8_transform_resumes_bitwise(tmp_path, workers, monkeypatch):
    """Batch k of a stream resumed at k equals batch k of the uninterrupted stream, bit for bit, with the uint8
    crop path (full-scale decode_jpeg and reduced-scale PIL decodes both occur at 96 px from 300-700 px JPEGs)."""
    spec = _photo_shards(tmp_path / "shards")
    tf = pretrain_transform(96, output="uint8")
    import data.resized_crop as crop_mod

    scales, real = [], crop_mod.uint8_pixels
    monkeypatch.setattr(crop_mod, "uint8_pixels", lambda img, reduce=1: (scales.append(reduce), real(img, reduce))[1])

    def first(n, start=0):
        loader = build_train_loader(spec, batch_size=3, transform=tf, seed=5, num_workers=workers,
                                    shuffle_buffer=4, start_sample=3 * start)
        return [b["image"] for b in _take(loader, n)]

    full = first(7)
    assert all(b.dtype == torch.uint8 and b.shape == (3, 3, 96, 96) for b in full)
    assert not torch.equal(full[0], full[4])  # different samples and crops
    resumed = first(3, start=4)
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a, b)
    if workers == 0:  # the spy sees the in-process decodes: full-scale and 1/2-scale both occurred
        assert {1, 2} <= set(scales)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_device_loader_resumes_exactly_and_feeds_device_batches():
    loader = build_device_loader(f"{SAMPLE}:test", batch_size=16, img_size=32, device="cpu", seed=3)
    images, labels = loader.images, loader.labels
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and loader.n_corrupt == 0
    batches = _take(loader, 66)  # 1056 images: into the second epoch of 1000
    assert loader.state_dict()["cursor"] == 66 * 16
    assert [p for b in batches for p in b["position"].tolist()] == list(range(66 * 16))
    again = DeviceTrainLoader(images, labels, batch_size=16, img_size=32, seed=3)
    again.load_state_dict({**loader.state_dict(), "cursor": 3 * 16})
    for a, b in zip(batches[3:], _take(again, 2)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    again.load_state_dict({**loader.state_dict(), "batches": 5})  # the entry points' micro-batches per rank
    assert again.cursor == 80
    with pytest.raises(ValueError, match="seed: saved 4"):
        again.load_state_dict({**loader.state_dict(), "seed": 4})
    with pytest.raises(ValueError, match="order: saved tessera-order/1"):  # a shard-stream checkpoint
        again.load_state_dict({**loader.state_dict(), "order": "tessera-order/1"})
    out = next(iter(device_batches(loader, "cpu", mean=CIFAR10_MEAN, std=CIFAR10_STD)))
    assert out["image"].dtype == torch.float32 and out["label"].shape == (16,)
    # world sizes 2 and 4 (same global batch): the ranks' micro-batch k together is the single process's batch k,
    # crops included (keyed by epoch and image), also across the epoch boundary and after a resume at cursor 48
    for world in (2, 4):
        ranks = [_take(DeviceTrainLoader(images, labels, batch_size=16 // world, img_size=32, seed=3, rank=r,
                                         world_size=world, start_sample=48), 63) for r in range(world)]
        for k, ref in enumerate(batches[3:]):
            assert torch.equal(torch.cat([ranks[r][k]["image"] for r in range(world)]), ref["image"])
            assert torch.equal(torch.cat([ranks[r][k]["label"] for r in range(world)]), ref["label"])


def test_device_loader_gives_every_image_once_per_epoch_over_ranks():
    """Images of constant value i (their index) stay constant through any crop: the value names the image."""
    n = 240
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    seen = []
    for rank in range(3):  # 3 ranks x 20 micro-batches of 4 = one epoch, and the first of the next
        loader = DeviceTrainLoader(images, torch.arange(n), batch_size=4, img_size=8, seed=1, rank=rank,
                                   world_size=3, sample_fn=lambda s: {"seed": torch.tensor(s)})
        for b in _take(loader, 21):
            assert torch.equal(b["image"][:, 0, 0, 0].long(), b["label"])
            assert b["seed"].tolist() == [mix_seed(1, "sample", p // n, i)  # the extras follow the image
                                          for p, i in zip(b["position"].tolist(), b["label"].tolist())]
            seen += b["label"].tolist()
    assert sorted(seen[:80] + seen[84:164] + seen[168:248]) == list(range(n))


def test_device_crops_identity_flip_and_box_distribution():
    images = _uint8_batch(6, 32, 32, seed=4)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 6)
    assert torch.equal(resized_crops(images, whole, torch.zeros(6, dtype=torch.bool), 32), images)
    assert torch.equal(resized_crops(images, whole, torch.ones(6, dtype=torch.bool), 32), images.flip(-1))
    # a 2x integer upscale of a box with bilinear sampling: every output pixel within the box's value range
    box = torch.tensor([[4.0, 8.0, 16.0, 16.0]] * 6)
    up = resized_crops(images, box, torch.zeros(6, dtype=torch.bool), 32, mode="bilinear")
    patch = images[:, :, 4:20, 8:24]
    assert (up.amax(dim=(2, 3)) <= patch.amax(dim=(2, 3))).all()
    assert (up.amin(dim=(2, 3)) >= patch.amin(dim=(2, 3))).all()
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(20000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), g, "cpu")
    top, left, h, w = boxes.unbind(1)
    assert bool(((top + h) <= 32).all() and ((left + w) <= 32).all() and (top >= 0).all() and (left >= 0).all())
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, 32, 32), [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(20000)], dtype=torch.float32)
    assert abs((h * w).mean() - (ref[:, 2] * ref[:, 3]).mean()) / 1024 < 0.01  # same area law as torchvision


def test_device_erasing_boxes_seeded_and_timm_like():
    x = torch.randn(64, 3, 40, 48)
    erase = DeviceRandomErasing(probability=1.0, mode="pixel")
    a = erase(x, erasing_generator("cpu", 7))
    b = erase(x, erasing_generator("cpu", 7))
    assert torch.equal(a, b) and not torch.equal(a, erase(x, erasing_generator("cpu", 8)))
    mask = erase.boxes(64, 40, 48, erasing_generator("cpu", 7), "cpu")[:, 0]  # [N, H, W]
    frac = mask.flatten(1).float().mean(1)
    assert (frac > 0).all() and (frac <= 1 / 3 + 0.02).all() and (frac >= 0.02 - 0.01).all()
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask.flatten(1).sum(1), rows.sum(1) * cols.sum(1))  # one rectangle each
    changed = a != x
    assert torch.equal(changed.any(1), mask)  # exactly the boxes changed
    assert torch.equal(DeviceRandomErasing(probability=0.0)(x, erasing_generator("cpu", 1)), x)
    some = DeviceRandomErasing(probability=0.25).boxes(4000, 40, 48, erasing_generator("cpu", 3), "cpu")
    assert abs(some.flatten(1).any(1).float().mean() - 0.25) < 0.03
    const = DeviceRandomErasing(probability=1.0, mode="const")(x, erasing_generator("cpu", 7))
    assert bool((const[mask.unsqueeze(1).expand_as(x)] == 0).all())
