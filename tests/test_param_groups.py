"""Parameter groups: weight decay placement and BEiT/MAE layer-wise lr decay on a tiny timm ViT (hand lists)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from launch.param_groups import layer_id, param_groups
from models.variants import create_mae


def tiny_vit():
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)


def names_by_group(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [sorted(ids[id(p)] for p in g["params"]) for g in groups]


def test_weight_decay_only_on_matrices():
    model = tiny_vit()
    groups = param_groups(model, weight_decay=0.05)
    decay = {n for g, names in zip(groups, names_by_group(model, groups)) if g["weight_decay"] > 0 for n in names}
    no_decay = {n for g, names in zip(groups, names_by_group(model, groups)) if g["weight_decay"] == 0 for n in names}
    expected_decay = {n for n, p in model.named_parameters() if p.ndim >= 2} - {"cls_token", "pos_embed"}
    assert decay == expected_decay
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias", "head.bias"} <= no_decay
    assert "patch_embed.proj.weight" in decay and "head.weight" in decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_layer_decay_scales_hand_list():
    model = tiny_vit()
    decay = 0.5
    groups = param_groups(model, weight_decay=0.05, layer_decay=decay)
    scale_of = {n: g["lr_scale"] for g, names in zip(groups, names_by_group(model, groups)) for n in names}
    # depth 2 -> num_layers 3: embeddings layer 0 (0.5^3), blocks.0 layer 1 (0.5^2), blocks.1 layer 2 (0.5^1),
    # norm/head layer 3 (1.0)
    hand = {
        "cls_token": 0.125, "pos_embed": 0.125, "patch_embed.proj.weight": 0.125, "patch_embed.proj.bias": 0.125,
        "blocks.0.attn.qkv.weight": 0.25, "blocks.0.mlp.fc2.bias": 0.25, "blocks.0.norm1.weight": 0.25,
        "blocks.1.attn.proj.weight": 0.5, "blocks.1.norm2.bias": 0.5,
        "norm.weight": 1.0, "norm.bias": 1.0, "head.weight": 1.0, "head.bias": 1.0,
    }
    for name, scale in hand.items():
        assert scale_of[name] == pytest.approx(scale), name
    # every parameter is in exactly one group
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))


def test_layer_id_ignores_prefixes_and_decoder_blocks():
    assert layer_id("encoder.blocks.3.mlp.fc1.weight", 13) == 4
    assert layer_id("module.encoder.cls_token", 13) == 0
    assert layer_id("decoder_blocks.0.attn.qkv.weight", 13) == 13
    assert layer_id("fc_norm.weight", 13) == 13


def test_mae_frozen_pos_embeds_left_out_and_tokens_not_decayed():
    mae = create_mae("mae_vit_tiny_patch4_dec128d2b", patch_size=8, embed_dim=16, depth=2, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    groups = param_groups(mae, weight_decay=0.05)
    named = {n: g["weight_decay"] for g, names in zip(groups, names_by_group(mae, groups)) for n in names}
    assert "encoder.pos_embed" not in named and "decoder_pos_embed" not in named  # frozen sin-cos
    assert named["mask_token"] == 0.0 and named["encoder.cls_token"] == 0.0
    assert named["decoder_blocks.0.mlp.fc1.weight"] == 0.05
    assert torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
