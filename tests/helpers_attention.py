"""Test helper: a constructed ViT whose last block's CLS attention is forced onto one chosen patch."""

import torch


def force_cls_onto(vit, x, patch_index, margin=60.0):
    """Rewrite the last block's qkv so that every query (CLS included) attends to one patch of image 0.

    LayerNorm with weight 1 and bias 0 maps every token to a vector y_t of (nearly) the same norm sqrt(D). With a
    constant query q = c*e_0 in each head (qkv weight 0, bias c on the head's first dim) and the key's first dim
    k_t[0] = <u, y_t>, u = y_j/|y_j| (all other key dims 0), the score of token t is scale*c*<u, y_t>, which by
    Cauchy-Schwarz is largest at t = j. `c` is chosen so that the runner-up trails by `margin` nats."""
    last = vit.blocks[-1]
    seen = {}
    hook = last.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach()))
    with torch.no_grad():
        vit.forward_features(x)
    hook.remove()
    y = seen["y"][0]  # [T, D]
    j = 1 + patch_index  # after the CLS token
    u = y[j] / y[j].norm()
    proj = y @ u  # [T]
    gap = (proj[j] - torch.cat([proj[:j], proj[j + 1:]]).max()).item()
    assert gap > 0
    attn = last.attn
    c = margin / (gap * attn.scale)
    d, dh = attn.qkv.in_features, attn.head_dim
    with torch.no_grad():
        attn.qkv.weight[: 2 * d].zero_()
        attn.qkv.bias[: 2 * d].zero_()
        for h in range(attn.num_heads):
            attn.qkv.bias[h * dh] = c  # query, head h, dim 0
            attn.qkv.weight[d + h * dh] = u  # key, head h, dim 0
