"""Random masking by argsort of noise and BEiT-style block masks expressed as noise."""

import pytest
import torch

from models.masking import block_mask, block_mask_noise, random_masking


@pytest.mark.parametrize("length,ratio", [(64, 0.75), (49, 0.75), (10, 0.33), (196, 0.9), (16, 0.0)])
def test_keep_count_restore_and_gather(length, ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, length, 5, generator=g)
    noise = torch.rand(3, length, generator=g)
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    k = int(length * (1 - ratio))
    assert kept.shape == (3, k, 5)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - k)))
    order = torch.argsort(noise, dim=1)
    # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(order, 1, ids_restore), torch.arange(length).expand(3, -1))
    for n in range(3):
        smallest = set(torch.topk(noise[n], k, largest=False).indices.tolist())
        assert {i for i in range(length) if mask[n, i] == 0} == smallest  # the k smallest noises are kept
        assert torch.equal(kept[n], x[n, order[n, :k]])  # and gathered in noise order


def test_same_noise_same_mask_and_random_default():
    x = torch.randn(2, 49, 4)
    noise = torch.rand(2, 49)
    a = random_masking(x, 0.75, noise.clone())
    b = random_masking(x, 0.75, noise.clone())
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    m1 = random_masking(x, 0.75)[1]
    m2 = random_masking(x, 0.75)[1]
    assert m1.shape == (2, 49) and not torch.equal(m1, m2)
    assert not torch.equal(m1[0], m1[1]) or not torch.equal(m2[0], m2[1])  # per-sample masks


def test_bad_inputs():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(x, 0.5, torch.rand(2, 9))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)


def _same_state_neighbour_fraction(m):  # m [N, H, W] bool
    horiz = (m[:, :, 1:] == m[:, :, :-1]).float().mean()
    vert = (m[:, 1:, :] == m[:, :-1, :]).float().mean()
    return float((horiz + vert) / 2)


def test_block_masks_are_blocks_within_budget():
    g = torch.Generator().manual_seed(1)
    m = block_mask(64, 14, 14, num_masked=98, generator=g)  # BEiT-like setting at 50 %
    counts = m.flatten(1).sum(1)
    assert (counts <= 98).all()
    assert counts.float().mean() > 0.85 * 98  # rarely stops far short of the budget
    # contiguous blocks: neighbouring patches share their state far more often than under random masking (0.5)
    assert _same_state_neighbour_fraction(m) > 0.75
    rand = torch.rand(64, 196, generator=g).argsort(1).argsort(1) < 98
    assert _same_state_neighbour_fraction(rand.view(64, 14, 14)) < 0.6
    # each mask is a union of rectangles: every masked patch has a masked 4-neighbour when blocks are >= 2x2
    padded = torch.nn.functional.pad(m.float(), (1, 1, 1, 1))
    nb = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = (m & (nb == 0)).sum() / m.sum()
    assert isolated < 0.02


@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_block_noise_gives_exact_ratio_through_argsort(ratio):
    g = torch.Generator().manual_seed(2)
    noise = block_mask_noise(32, 8, 8, ratio, generator=g)
    assert noise.shape == (32, 64)
    x = torch.randn(32, 64, 3)
    _, mask, _ = random_masking(x, ratio, noise)
    assert torch.equal(mask.sum(1), torch.full((32,), float(64 - int(64 * (1 - ratio)))))
    assert abs(mask.mean().item() - ratio) < 1 / 64 + 1e-6
    # block patches (noise >= 1) are always among the removed ones
    assert bool((mask[noise >= 1] == 1).all())
    g2 = torch.Generator().manual_seed(2)
    assert torch.equal(block_mask_noise(32, 8, 8, ratio, generator=g2), noise)  # seeded = reproducible


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_no_graph_break_for_either_mask_type(mask_type):
    """The whole MAE forward (masks made inside it) is one graph: block masks have no data-dependent branch or
    host read-back (the former early exit broke the graph twice)."""
    from models.mae import MaskedAutoencoder

    model = MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                              decoder_depth=1, decoder_num_heads=2, mask_type=mask_type)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_block_mask_is_seeded_and_batch_independent_of_rounds_exit():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = block_mask(16, 14, 14, num_masked=147, generator=g1)
    b = block_mask(16, 14, 14, num_masked=147, generator=g2)
    assert torch.equal(a, b)
    counts = a.flatten(1).sum(1)
    assert (counts <= 147).all() and counts.float().mean() > 0.95 * 147  # 16 rounds x 4 proposals reach the budget
