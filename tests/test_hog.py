"""HOG targets (MaskFeat): the vectorised device version against a float64 loop written here, hand-worked edges,
the per-patch layout, invariance to per-channel affine changes, float32 under autocast, and MAE/SimMIM with HOG."""

import math

import pytest
import torch

from models.hog import hog_cells, hog_dim, hog_patches
from models.mae import MaskedAutoencoder
from models.patch_targets import PatchTargets


def hog_reference(img: torch.Tensor, cell: int, bins: int) -> torch.Tensor:
    """One image [C, H, W] -> [C, bins, H/cell, W/cell], pixel by pixel in float64 Python arithmetic."""
    c_n, h, w = img.shape
    x = img.double().tolist()

    def at(c, i, j):  # reflected border: index -1 reads 1, index H reads H-2
        i = -i if i < 0 else (2 * (h - 1) - i if i >= h else i)
        j = -j if j < 0 else (2 * (w - 1) - j if j >= w else j)
        return x[c][i][j]

    hist = torch.zeros(c_n, h // cell, w // cell, bins, dtype=torch.float64)
    width = math.pi / bins
    for c in range(c_n):
        for i in range(h):
            for j in range(w):
                gx = at(c, i, j + 1) - at(c, i, j - 1)
                gy = at(c, i + 1, j) - at(c, i - 1, j)
                angle = math.atan2(gy, gx) % math.pi
                b = min(int(angle // width), bins - 1)
                hist[c, i // cell, j // cell, b] += math.hypot(gx, gy)
    norm = hist.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=1e-12)
    return (hist / norm).permute(0, 3, 1, 2)


def quantised_images(n, c, h, w, seed=0):
    """Pixel values k/64: gradients are exact in float32, so float32 and float64 agree on every orientation bin."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).float() / 64


@pytest.mark.parametrize("cell,bins", [(4, 9), (2, 6), (8, 9)])
def test_matches_float64_loop_reference(cell, bins):
    imgs = quantised_images(2, 3, 16, 16)
    got = hog_cells(imgs, cell, bins)
    assert got.shape == (2, 3, bins, 16 // cell, 16 // cell) and got.dtype == torch.float32
    for n in range(2):
        torch.testing.assert_close(got[n].double(), hog_reference(imgs[n], cell, bins), rtol=1e-5, atol=1e-6)


def test_hand_worked_edges():
    # vertical step edge between columns 3 and 4: gx = 1 at columns 3 and 4 (centred difference), gy = 0, so the
    # orientation is 0 and all of every cell's magnitude falls into bin 0; the cells away from the edge get nothing
    img = torch.zeros(1, 1, 8, 12)
    img[..., :, 4:] = 1.0
    h = hog_cells(img, cell=4, bins=9)[0, 0]  # [bins, 2, 3]
    expected = torch.zeros(9, 2, 3)
    expected[0, :, :2] = 1.0  # cell columns 0 (holds column 3) and 1 (holds column 4); column 2 is flat
    torch.testing.assert_close(h, expected)
    # horizontal edge: gradient along y, orientation 90 degrees -> bin floor(90 / 20) = 4
    h = hog_cells(img.transpose(2, 3).contiguous(), cell=4, bins=9)[0, 0]
    assert torch.equal(h.argmax(0)[:2], torch.full((2, 2), 4)) and h[4, :2].eq(1.0).all()
    # a dark-to-bright and a bright-to-dark edge have the same unsigned orientation
    torch.testing.assert_close(hog_cells(1 - img, 4, 9), hog_cells(img, 4, 9))


def test_patch_layout_and_dim():
    imgs = quantised_images(2, 3, 16, 16, seed=1)
    cells = hog_cells(imgs, cell=4, bins=9)  # [2, 3, 9, 4, 4]
    t = hog_patches(imgs, patch_size=8, cell=4, bins=9)  # 2x2 patches of 2x2 cells
    assert t.shape == (2, 4, hog_dim(8, 3, 4, 9)) == (2, 4, 108)
    k = 2
    for n, ph, pw, i, j, c, b in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 0, 2, 5), (0, 1, 1, 1, 1, 1, 8)]:
        assert t[n, ph * 2 + pw, ((i * k + j) * 3 + c) * 9 + b] == cells[n, c, b, ph * k + i, pw * k + j]


def test_invariant_to_per_channel_affine_and_float32_under_autocast():
    imgs = quantised_images(2, 3, 16, 16, seed=2)
    scale = torch.tensor([2.0, 0.5, 4.0]).view(1, 3, 1, 1)
    shift = torch.tensor([-1.0, 0.25, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(hog_patches(imgs * scale + shift, 8, 4), hog_patches(imgs, 8, 4), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hog_patches(imgs, 8, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hog_patches(imgs, 8, 4))


def test_bad_cells_are_refused():
    with pytest.raises(ValueError, match="divide the patch size"):
        PatchTargets("hog", patch_size=8, in_chans=3, hog_cell=3)
    with pytest.raises(ValueError, match="pixel targets only"):
        PatchTargets("hog", patch_size=8, norm_pix=True)
    assert PatchTargets("hog", patch_size=16, in_chans=3).dim == 2 * 2 * 3 * 9  # MaskFeat: 8 px cells in 16 px


def test_mae_regresses_hog_on_masked_patches():
    torch.manual_seed(0)
    m = MaskedAutoencoder(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2, target="hog", hog_cell=4)
    imgs = quantised_images(2, 3, 16, 16, seed=3)
    loss, pred, mask = m(imgs, noise=torch.rand(2, 4))
    assert pred.shape == (2, 4, 108)
    total, count = 0.0, 0
    for n in range(2):
        ref = hog_reference(imgs[n], 4, 9)  # [3, 9, 4, 4]
        for p in range(4):
            if mask[n, p] == 1:
                ph, pw = divmod(p, 2)
                cells = ref[:, :, ph * 2:ph * 2 + 2, pw * 2:pw * 2 + 2]  # [c, b, i, j]
                target = cells.permute(2, 3, 0, 1).reshape(-1)  # (i, j, c, b)
                total += ((pred[n, p].double() - target) ** 2).mean().item()
                count += 1
    assert count == 6 and loss.item() == pytest.approx(total / count, rel=1e-5)
