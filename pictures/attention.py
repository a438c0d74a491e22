"""Attention pictures of a ViT: per image, the CLS-to-patch attention of chosen blocks (mean over heads), the
attention rollout through all blocks, and the heads of one block, each overlaid on the image.

The maps come from `models.attention_maps` (the model's own forward pass); this module only draws them."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from launch.config import ConfigError
from models.attention_maps import attention_rollout, capture_attention, cls_attention_maps, patch_grid, rollout_cls_map
from pictures.heatmap import overlay
from pictures.image_grid import denormalize, display_scale, grid, save_png, to_pil, upscale


def select_layers(layers: tuple[int, ...], depth: int) -> list[int]:
    """Block indices (negative ones count from the end; empty: all blocks), checked against `depth`."""
    chosen = []
    for k in layers or range(depth):
        if not -depth <= k < depth:
            raise ConfigError(f"layer {k} does not exist: the encoder has {depth} blocks (0..{depth - 1}, or negative)")
        chosen.append(k % depth)
    return chosen


def attention_pictures(encoder, images: torch.Tensor, mean, std, out_dir: Path, *, layers: tuple[int, ...] = (),
                       head_layer: int | None = -1, rollout: bool = True, head_fusion: str = "mean",
                       alpha: float = 0.5, cmap: str = "jet", display_size: int = 128) -> dict:
    """Capture the attention of every block on `images` (normalised [N,C,H,W]) and write `attention_layers.png`
    (columns: image, each chosen block, the rollout) and, unless `head_layer` is None,
    `attention_heads_block<K>.png` (image, each head of block K, their mean) into `out_dir`.

    Returns {"files": [...], "maps": {"block<k>": [N, rows, cols] mean over heads, "rollout": [N, rows, cols],
    "block<K>_heads": [N, heads, rows, cols]}}."""
    maps = capture_attention(encoder, images)  # depth x [N, heads, T, T]
    rows_cols = patch_grid(encoder, images)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    has_cls = getattr(encoder, "cls_token", None) is not None
    depth = len(maps)
    chosen = select_layers(layers, depth)
    per_layer = {k: cls_attention_maps(maps[k], rows_cols, prefix, has_cls).mean(dim=1) for k in chosen}  # [N, r, c]
    rolled = None
    if rollout:
        rolled = rollout_cls_map(attention_rollout(maps, head_fusion), rows_cols, prefix, has_cls)  # [N, r, c]

    pixels = denormalize(images, mean, std)  # [N, C, H, W] in [0, 1]
    factor = display_scale(pixels.shape[-2], pixels.shape[-1], display_size)
    bases = [upscale(to_pil(p), factor) for p in pixels]

    def draw(base, heat):
        return overlay(base, heat, alpha, cmap)

    rows = []
    for i, base in enumerate(tqdm(bases, desc="attention maps", disable=len(bases) < 8)):
        row = [base] + [draw(base, per_layer[k][i]) for k in chosen]
        if rolled is not None:
            row.append(draw(base, rolled[i]))
        rows.append(row)
    titles = ["image"] + [f"block {k}" for k in chosen] + (["rollout"] if rolled is not None else [])
    files = [save_png(grid(rows, col_labels=titles), out_dir / "attention_layers.png")]

    result_maps = {f"block{k}": per_layer[k] for k in chosen}
    if rolled is not None:
        result_maps["rollout"] = rolled
    if head_layer is not None:
        k = select_layers((head_layer,), depth)[0]
        heads = cls_attention_maps(maps[k], rows_cols, prefix, has_cls)  # [N, heads, r, c]
        head_rows = [[base] + [draw(base, heads[i, h]) for h in range(heads.shape[1])] + [draw(base, heads[i].mean(0))]
                     for i, base in enumerate(bases)]
        titles = ["image"] + [f"head {h}" for h in range(heads.shape[1])] + ["mean"]
        files.append(save_png(grid(head_rows, col_labels=titles), out_dir / f"attention_heads_block{k}.png"))
        result_maps[f"block{k}_heads"] = heads
    return {"files": files, "maps": result_maps}
