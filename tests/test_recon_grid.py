"""The reconstruction grid (pictures/recon_grid.py) on the real tiny MAE: visible patches pasted back equal the
original, the reconstruction is the model's prediction (un-normalised with the true patch statistics under
norm_pix_loss), the masking is fixed by the seed, the PNG has the expected layout and pixels, the model's mode is
restored."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.mae import MaskedAutoencoder
from pictures.image_grid import cell_box
from pictures.recon_grid import MASK_GREY, reconstruct, save_reconstruction_grid

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _mae(norm_pix=False, seed=0):
    torch.manual_seed(seed)
    return MaskedAutoencoder(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix)


def _images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_is_the_models_prediction_and_pasting_keeps_visible_patches(norm_pix):
    model = _mae(norm_pix)
    x = _images()
    out = reconstruct(model, x, mask_ratio=0.75, seed=3)
    mask = out["mask"]  # [N, 1, H, W]
    assert mask.shape == (3, 1, 32, 32)
    # 16 patches, 12 removed per image
    assert torch.equal(mask.sum((1, 2, 3)), torch.full((3,), 12.0 * 64))
    visible = ~mask.bool().expand_as(x)
    assert torch.equal(out["pasted"][visible], x[visible])
    assert torch.equal(out["pasted"][~visible], out["reconstruction"][~visible])

    # independent: the same seeded noise through model.forward, un-normalised by hand in float64
    model.eval()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, pred, mask_ref = model(x, mask_ratio=0.75, noise=noise)
    pred = pred.double()
    if norm_pix:
        target = model.patchify(x).double()  # [N, L, p*p*C]
        pred = pred * (target.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    expected = model.unpatchify(pred)
    torch.testing.assert_close(out["reconstruction"].double(), expected, atol=1e-5, rtol=1e-5)
    mask_grid = mask_ref.reshape(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [N, H, W]
    assert torch.equal(mask[:, 0], mask_grid)


def test_same_seed_same_patches_and_mode_restored():
    model = _mae()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(2)
    a = reconstruct(model, x, seed=0)
    b = reconstruct(model, x, seed=0)
    c = reconstruct(model, x, seed=1)
    assert model.training
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["reconstruction"], b["reconstruction"])
    assert not torch.equal(a["mask"], c["mask"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_png_layout_and_pixels(tmp_path):
    model = _mae()
    x = _images(2)
    path = save_reconstruction_grid(model, x, tmp_path / "sub" / "recon.png", MEAN, STD, mask_ratio=0.5, seed=5,
                                    labels=False)
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    cell, pad = 128, 2  # 32 px drawn 4x
    assert img.shape == (2 * (cell + pad) + pad, 4 * (cell + pad) + pad, 3)
    out = reconstruct(model, x, mask_ratio=0.5, seed=5)
    for i in range(2):
        cells = [img[y0:y1, x0:x1] for x0, y0, x1, y1 in (cell_box(i, j, (cell, cell), pad) for j in range(4))]
        mask = out["mask"][i, 0].repeat_interleave(4, 0).repeat_interleave(4, 1).bool().numpy()  # [128, 128]
        assert 0 < mask.mean() < 1
        # recon+visible equals the original picture on the visible patches, and the reconstruction on the masked
        assert np.array_equal(cells[3][~mask], cells[0][~mask])
        assert np.array_equal(cells[3][mask], cells[2][mask])
        # masked column: grey where removed, the original elsewhere
        assert (cells[1][mask] == round(MASK_GREY * 255)).all()
        assert np.array_equal(cells[1][~mask], cells[0][~mask])
        # the original is the un-normalised input
        expected = (x[i] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
        expected = (expected.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int64)
        assert np.array_equal(cells[0][::4, ::4], expected)


def test_labels_add_a_title_row_and_wrapped_models_are_looked_through(tmp_path):
    model = _mae()
    x = _images(1)
    plain = Image.open(save_reconstruction_grid(model, x, tmp_path / "a.png", MEAN, STD, labels=False))
    wrapped = torch.nn.DataParallel(model)  # has .module, like DDP and DeepSpeed engines
    titled = Image.open(save_reconstruction_grid(wrapped, x, tmp_path / "b.png", MEAN, STD, scale=4))
    assert titled.width == plain.width and titled.height > plain.height
    with pytest.raises(TypeError, match="unwrap_model"):
        reconstruct(torch.nn.Linear(3, 3), x)
