"""2-D sin-cos position embedding: against an independent float64 loop, layout, and use in the MAE."""

import math

import pytest
import torch

from models.pos_embed import sincos_2d
from models.variants import create_mae


def reference_table(dim, gh, gw):
    """Written independently from the formula: explicit loops over patches and channels, float64 math."""
    quarter = dim // 4
    rows = []
    for i in range(gh):  # row index
        for j in range(gw):  # column index
            row = []
            for pos in (j, i):  # first half: column (official MAE layout), second half: row
                row += [math.sin(pos / 10000 ** (k / quarter)) for k in range(quarter)]
                row += [math.cos(pos / 10000 ** (k / quarter)) for k in range(quarter)]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim,gh,gw", [(16, 4, 4), (32, 3, 5), (8, 7, 2)])
def test_matches_float64_loops(dim, gh, gw):
    table = sincos_2d(dim, gh, gw, cls_token=True)
    assert table.dtype == torch.float32 and table.shape == (1 + gh * gw, dim)
    assert torch.equal(table[0], torch.zeros(dim))
    ref = reference_table(dim, gh, gw)
    torch.testing.assert_close(table[1:].double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(sincos_2d(dim, gh, gw, cls_token=False), table[1:])


def test_first_half_encodes_column():
    t = sincos_2d(16, 4, 4, cls_token=False).view(4, 4, 16)  # [h, w, D]
    # moving down a column leaves the first half unchanged; moving along a row leaves the second half unchanged
    assert torch.equal(t[0, :, :8], t[3, :, :8])
    assert torch.equal(t[:, 0, 8:], t[:, 3, 8:])
    assert not torch.equal(t[0, 0, :8], t[0, 1, :8])


def test_bad_dim_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(18, 2, 2)


def test_mae_pos_embeds_fixed_and_nonzero_after_construction():
    m = create_mae("mae_vit_tiny_patch4_dec128d2b", depth=1, decoder_depth=1)
    for pe, dim in ((m.encoder.pos_embed, 192), (m.decoder_pos_embed, 128)):
        assert not pe.requires_grad
        assert pe.abs().sum() > 0
        torch.testing.assert_close(pe[0], sincos_2d(dim, 8, 8), rtol=0, atol=0)
    names = {n for n, _ in m.named_parameters()}
    assert {"encoder.pos_embed", "decoder_pos_embed"} <= names  # in the state dict, as the official checkpoints
