"""Pictures of what a trained ViT looks at, and of what an MAE reconstructs.

    python pictures/visualize.py checkpoint=runs/pretrain vis.images=data/sample:test vis.num_images=4
    python pictures/visualize.py checkpoint=mae_visualize_vit_base.pth vis.images=photos/ vis.reconstruction=yes
    python pictures/visualize.py checkpoint=timm:vit_base_patch16_224 weights=model.safetensors vis.images=a.jpg,b.jpg

`checkpoint=` is a pretraining run directory (mae.safetensors, else encoder.safetensors), a fine-tuning run
directory or classifier file (classifier.json beside it), any weights file `models/convert.py` reads (ours, official
MAE `.pth`, HF ViTMAE, timm), or `timm:NAME` with `weights=FILE` (read by `launch/weights.py`). Writes into
`run.output_dir`:

- `attention_layers.png`: per image, the CLS-to-patch attention of each block (mean over heads) and, with
  `vis.rollout=true`, the attention rollout through all blocks, overlaid on the image (bilinear upsampling, colormap);
- `attention_heads_block<K>.png`: the same for each head of block `vis.head_layer`;
- `reconstruction.png` (MAE checkpoints with a decoder): original | masked | reconstruction | with visible patches;
- `summary.json`: what the checkpoint was taken for, the architecture, and the files.

The attention comes from the model's own forward pass (`models.attention_maps`: hooks on timm's Attention), not a
re-implementation. Attention heads are not visible in weight shapes: they come from `num_heads=`, the run's
config.yaml, `arch=`, the safetensors metadata, else embed_dim/64 (said so in the output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import torch

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from launch.config import opt, parse_cli, section, to_dict
from launch.errors import cli
from pictures.attention import attention_pictures
from pictures.image_input import load_images
from pictures.recon_grid import save_reconstruction_grid
from pictures.visual_model import check_reconstruction_possible, load_visual_model

PROG = "pictures/visualize.py"


@dataclass
class VisSection:
    images: str = opt("data/sample:test", "images: files (comma-separated), a folder of images, or a dataset spec "
                                          "(folder with dataset.json[:split], shard pattern)")
    num_images: int = opt(4, "how many images (the first N)")
    seed: int = opt(0, "seed of the reconstruction's mask")
    mask_ratio: float = opt(0.75, "mask ratio of the reconstruction")
    attention: bool = opt(True, "draw the attention maps")
    layers: tuple[int, ...] = opt((), "blocks drawn in attention_layers.png, e.g. 0,5,11 or -1 (empty: all)")
    head_layer: int | None = opt(-1, "block whose heads are drawn one by one (None: skip)")
    rollout: bool = opt(True, "add the attention rollout (Abnar & Zuidema) through all blocks")
    head_fusion: Literal["mean", "max"] = opt("mean", "how the rollout fuses heads")
    reconstruction: Literal["auto", "yes", "no"] = opt("auto", "draw the MAE reconstruction grid (auto: when the "
                                                               "checkpoint has a decoder; yes: error if it has none)")
    alpha: float = opt(0.5, "weight of the heat map in the overlay")
    colormap: str = opt("jet", "heat-map colours: a matplotlib colormap name (jet, viridis, inferno, ...)")
    display_size: int = opt(128, "upscale small images (nearest) until the shorter side reaches this many pixels")

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.colormap not in matplotlib.colormaps:
            raise ValueError(f"colormap {self.colormap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")


@dataclass
class VisDataSection:
    mean: tuple[float, ...] | None = opt(None, "normalisation mean (None: the run's, else ImageNet's)")
    std: tuple[float, ...] | None = opt(None, "normalisation std (None: the run's, else ImageNet's)")
    crop_pct: float | None = opt(None, "centre-crop fraction of the eval transform (None: 1.0 up to 64 px, else 0.875)")


@dataclass
class VisRunSection:
    output_dir: str = opt("runs/visualize", "folder for the PNGs and summary.json")
    device: str = opt("auto", "torch device (auto: cuda when available, else cpu)")


@dataclass
class VisualizeConfig:
    checkpoint: str = opt("runs/pretrain", "run directory, weights file (ours, official MAE .pth, HF, timm), "
                                           "classifier file, or timm:NAME (with weights=)")
    weights: str | None = opt(None, "weights file for checkpoint=timm:NAME")
    arch: str | None = opt(None, "architecture when the checkpoint does not say: an MAE variant name or timm:NAME")
    num_heads: int | None = opt(None, "encoder attention heads (not visible in weight shapes)")
    decoder_num_heads: int | None = opt(None, "MAE decoder attention heads (not visible in weight shapes)")
    norm_pix_loss: bool | None = opt(None, "whether the MAE predicts per-patch normalised pixels (None: the run's "
                                           "config.yaml, else false; official *_full.pth checkpoints need true)")
    vis: VisSection = section(VisSection, "what is drawn")
    data: VisDataSection = section(VisDataSection, "normalisation and crop")
    run: VisRunSection = section(VisRunSection, "where the pictures go")

    RENAMED = {**{k: f"vis.{k}" for k in ("images", "num_images", "seed", "mask_ratio", "attention", "layers",
                                          "head_layer", "rollout", "head_fusion", "reconstruction", "alpha",
                                          "colormap", "display_size")},
               "mean": "data.mean", "std": "data.std", "crop_pct": "data.crop_pct", "output_dir": "run.output_dir",
               "device": "run.device"}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: VisualizeConfig) -> dict:
    """Everything `main` does, raising ConfigError for bad input; returns the summary (with the maps as tensors)."""
    model = load_visual_model(cfg.checkpoint, weights=cfg.weights, arch=cfg.arch, num_heads=cfg.num_heads,
                              decoder_num_heads=cfg.decoder_num_heads, norm_pix_loss=cfg.norm_pix_loss)
    v = cfg.vis
    check_reconstruction_possible(model, v.reconstruction)
    mean = tuple(cfg.data.mean or model.mean or IMAGENET_MEAN)
    std = tuple(cfg.data.std or model.std or IMAGENET_STD)
    img_size = int(model.encoder.patch_embed.img_size[0])
    images, names = load_images(v.images, v.num_images, eval_transform(img_size, mean, std,
                                                                       crop_pct=cfg.data.crop_pct))
    device = _device(cfg.run.device)
    images = images.to(device)
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    files: list[Path] = []
    maps: dict = {}
    if v.attention:
        pics = attention_pictures(model.encoder.to(device), images, mean, std, out_dir, layers=v.layers,
                                  head_layer=v.head_layer, rollout=v.rollout, head_fusion=v.head_fusion,
                                  alpha=v.alpha, cmap=v.colormap, display_size=v.display_size)
        files += pics["files"]
        maps = pics["maps"]
    if model.mae is not None and v.reconstruction != "no":
        files.append(save_reconstruction_grid(model.mae.to(device), images, out_dir / "reconstruction.png", mean, std,
                                              mask_ratio=v.mask_ratio, seed=v.seed))
    summary = {
        "checkpoint": model.path,
        "read_as": model.kind,
        "format": model.fmt,
        "architecture": model.arch,
        "images": names,
        "mean": list(mean),
        "std": list(std),
        "notes": model.notes,
        "files": [str(f) for f in files],
        "config": to_dict(cfg),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {**summary, "maps": maps}


def main(argv: list[str] | None = None) -> dict:
    result = run(parse_cli(VisualizeConfig, argv, PROG))
    print(f"{result['checkpoint']}: read as {result['read_as']} ({result['format']} format)")
    for note in result["notes"]:
        print(f"note: {note}")
    for f in result["files"]:
        print(f"wrote {f}")
    return result


if __name__ == "__main__":
    cli(PROG, main)()
