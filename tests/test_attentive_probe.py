"""The attentive probe head against a hand-written float64 cross-attention (explicit einsum and softmax) with the same
weights; gradients reach only the head; the CLS token is left out unless asked for; the optimizer's groups."""

from __future__ import annotations

import math

import pytest
import torch

import models.probe as ap
from finetune.probe_optim import build_attentive_optimizer
from models.vit import create_encoder


def reference_logits(head: ap.AttentiveProbeHead, tokens: torch.Tensor) -> torch.Tensor:
    """Float64, written out: per head h, softmax_t(q_h . k_th / sqrt(d_h)) weights v_th; heads concatenated;
    LayerNorm (biased variance); Linear. Keys and values are the first and second halves of the kv projection."""
    x = tokens.double()  # [N, T, D]
    n, t, d = x.shape
    h = head.num_heads
    dh = d // h
    w_kv, b_kv = head.pool.kv.weight.double(), head.pool.kv.bias.double()  # [2D, D], [2D]
    k = torch.einsum("ntd,ed->nte", x, w_kv[:d]) + b_kv[:d]  # [N, T, D]
    v = torch.einsum("ntd,ed->nte", x, w_kv[d:]) + b_kv[d:]  # [N, T, D]
    q = head.pool.latent.double().reshape(h, dh)  # [H, dh]: the latent is the query (no projection)
    k = k.reshape(n, t, h, dh)  # [N, T, H, dh]
    v = v.reshape(n, t, h, dh)
    scores = torch.einsum("hc,nthc->nht", q, k) / math.sqrt(dh)  # [N, H, T]
    weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)  # softmax over the tokens
    pooled = torch.einsum("nht,nthc->nhc", weights, v).reshape(n, d)  # [N, D]: heads side by side
    mu = pooled.mean(dim=-1, keepdim=True)
    var = ((pooled - mu) ** 2).mean(dim=-1, keepdim=True)
    normed = (pooled - mu) / torch.sqrt(var + head.norm.eps) * head.norm.weight.double() + head.norm.bias.double()
    return normed @ head.fc.weight.double().T + head.fc.bias.double()  # [N, C]


@pytest.mark.parametrize("num_heads", [1, 4])
def test_head_matches_a_hand_written_cross_attention(num_heads):
    torch.manual_seed(num_heads)
    head = ap.AttentiveProbeHead(32, 5, num_heads=num_heads)
    with torch.no_grad():  # away from the init (zero biases, unit LayerNorm) so every term is exercised
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head = head.double()
    tokens = torch.randn(3, 7, 32, dtype=torch.float64)
    got = head(tokens)
    assert got.shape == (3, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, reference_logits(head, tokens), rtol=1e-10, atol=1e-12)


def test_the_output_depends_on_the_tokens_only_through_attention_weights():
    # one token repeated: attention weights are uniform, so the pooled vector is that token's value projection
    torch.manual_seed(0)
    head = ap.AttentiveProbeHead(16, 3, num_heads=2).double()
    token = torch.randn(1, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(head(token.expand(1, 9, 16)), head(token), rtol=1e-12, atol=1e-12)


def tiny_encoder():
    torch.manual_seed(0)
    return create_encoder(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def test_gradient_flows_only_into_the_head():
    model = ap.AttentiveProbeClassifier(tiny_encoder(), num_classes=4).train()
    images = torch.randn(2, 3, 16, 16)
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    grads = {n: p.grad for n, p in model.head.named_parameters()}
    assert set(grads) == {"pool.latent", "pool.kv.weight", "pool.kv.bias", "norm.weight", "norm.bias", "fc.weight",
                          "fc.bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not model.encoder.training  # frozen in eval mode even after .train()


def test_features_are_patch_tokens_unless_cls_is_asked_for():
    encoder = tiny_encoder().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        everything = encoder.forward_features(images)  # [2, 1 + 4, 32]
    patches = ap.AttentiveProbeClassifier(encoder, 4).features(images)
    with_cls = ap.AttentiveProbeClassifier(encoder, 4, include_cls=True).features(images)
    assert patches.shape == (2, 4, 32) and with_cls.shape == (2, 5, 32)
    torch.testing.assert_close(patches, everything[:, 1:])
    torch.testing.assert_close(with_cls, everything)


def test_optimizer_decays_matrices_only():
    head = ap.AttentiveProbeHead(32, 5)
    opt = build_attentive_optimizer(head, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in head.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert by_decay == {0.05: ["fc.weight", "pool.kv.weight"],
                        0.0: ["fc.bias", "norm.bias", "norm.weight", "pool.kv.bias", "pool.latent"]}


def test_default_heads_and_a_width_they_do_not_divide():
    assert (ap.default_num_heads(192), ap.default_num_heads(768), ap.default_num_heads(32)) == (3, 12, 1)
    with pytest.raises(ValueError, match="5 heads do not divide the token width 32"):
        ap.AttentiveProbeHead(32, 2, num_heads=5)


def test_saved_attentive_probe_is_rebuilt_from_classifier_json(tmp_path):
    from conftest import load_classifier

    from finetune.export import save_classifier

    cfg = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = ap.AttentiveProbeClassifier(tiny_encoder(), 4, include_cls=True, num_heads=4).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    meta = {"kind": "probe", "head": "attentive", "attn_heads": 4, "include_cls": True, "encoder_cfg": cfg,
            "num_classes": 4, "img_size": 16}
    save_classifier(model.state_dict(), tmp_path / "classifier_best.safetensors", meta)
    loaded, _ = load_classifier(tmp_path)
    assert isinstance(loaded, ap.AttentiveProbeClassifier) and loaded.include_cls and loaded.head.num_heads == 4
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
