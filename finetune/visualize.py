"""Pictures of what a trained ViT looks at, and of what an MAE reconstructs.

    python finetune/visualize.py checkpoint=runs/pretrain images=data/sample:test num_images=4
    python finetune/visualize.py checkpoint=mae_visualize_vit_base.pth images=photos/ reconstruction=yes
    python finetune/visualize.py checkpoint=timm:vit_base_patch16_224 weights=model.safetensors images=a.jpg,b.jpg

`checkpoint=` is a pretraining run directory (mae.safetensors, else encoder.safetensors), a fine-tuning run
directory or classifier file (classifier.json beside it), any weights file `models/convert.py` reads (ours, official
MAE `.pth`, HF ViTMAE, timm), or `timm:NAME` with `weights=FILE`. Writes into `output_dir`:

- `attention_layers.png`: per image, the CLS-to-patch attention of each block (mean over heads) and, with
  `rollout=true`, the attention rollout through all blocks, overlaid on the image (bilinear upsampling, colormap);
- `attention_heads_block<K>.png`: the same for each head of block `head_layer`;
- `reconstruction.png` (MAE checkpoints with a decoder): original | masked | reconstruction | with visible patches;
- `summary.json`: what the checkpoint was taken for, the architecture, and the files.

The attention comes from the model's own forward pass (`models.attention_maps`: hooks on timm's Attention), not a
re-implementation. Attention heads are not visible in weight shapes: they come from `num_heads=`, the run's
config.yaml, `arch=`, the safetensors metadata, else embed_dim/64 (said so in the output).
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # `python finetune/visualize.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from tqdm import tqdm

from launch.config import ConfigError, opt, parse_cli, to_dict
from launch.pictures import COLORMAPS, IMAGENET_MEAN, IMAGENET_STD, denormalize, display_scale, grid, overlay, \
    save_png, to_pil, upscale
from launch.recon_grid import save_reconstruction_grid
from models.attention_maps import attention_rollout, capture_attention, cls_attention_maps, patch_grid, rollout_cls_map

PROG = "finetune/visualize.py"
REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")
_DECODER_PREFIXES = ("decoder_", "mask_token")


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
    images: str = opt("data/sample:test", "images: files (comma-separated), a folder of images, or a dataset spec "
                                          "(folder with dataset.json[:split], shard pattern)")
    num_images: int = opt(4, "how many images (the first N)")
    crop_pct: float | None = opt(None, "centre-crop fraction of the eval transform (None: 1.0 up to 64 px, else 0.875)")
    mean: tuple[float, float, float] | None = opt(None, "normalisation mean (None: the run's, else ImageNet's)")
    std: tuple[float, float, float] | None = opt(None, "normalisation std (None: the run's, else ImageNet's)")
    output_dir: str = opt("runs/visualize", "folder for the PNGs and summary.json")
    attention: bool = opt(True, "draw the attention maps")
    layers: tuple[int, ...] = opt((), "blocks drawn in attention_layers.png, e.g. 0,5,11 or -1 (empty: all)")
    head_layer: int | None = opt(-1, "block whose heads are drawn one by one (None: skip)")
    rollout: bool = opt(True, "add the attention rollout (Abnar & Zuidema) through all blocks")
    head_fusion: Literal["mean", "max"] = opt("mean", "how the rollout fuses heads")
    reconstruction: Literal["auto", "yes", "no"] = opt("auto", "draw the MAE reconstruction grid (auto: when the "
                                                               "checkpoint has a decoder; yes: error if it has none)")
    mask_ratio: float = opt(0.75, "mask ratio of the reconstruction")
    seed: int = opt(0, "seed of the reconstruction's mask")
    alpha: float = opt(0.5, "weight of the heat map in the overlay")
    colormap: Literal["viridis", "jet"] = opt("jet", "heat-map colours")
    display_size: int = opt(128, "upscale small images (nearest) until the shorter side reaches this many pixels")
    device: str = opt("auto", "torch device (auto: cuda when available, else cpu)")

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {COLORMAPS}")


@dataclass
class VisualModel:
    """What a checkpoint was read as: the encoder to draw attention from, the MAE when there is a decoder."""

    encoder: torch.nn.Module  # a timm VisionTransformer
    mae: torch.nn.Module | None
    kind: str  # "mae", "encoder", "classifier", "timm"
    path: str
    fmt: str
    arch: dict
    mean: tuple | None = None
    std: tuple | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- checkpoints


def _find_run_config(path: Path) -> tuple[dict, Path] | None:
    """The config.yaml of the run a weights file belongs to (beside it, or up to two folders above: checkpoints)."""
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        f = folder / "config.yaml"
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text())
            except yaml.YAMLError:
                return None
            return (data, f) if isinstance(data, dict) else None
    return None


def _mae_kwargs_from_run(run_cfg: dict) -> dict | None:
    """MaskedAutoencoder kwargs from a pretraining config.yaml (`model.name` + its overrides), if it names a variant."""
    from models.variants import MAE_VARIANTS, variant_kwargs

    model = run_cfg.get("model")
    if not isinstance(model, dict) or model.get("name") not in MAE_VARIANTS:
        return None
    extra = {k: model[k] for k in ("img_size", "mask_ratio", "mask_type", "norm_pix_loss") if k in model}
    for k, v in (model.get("overrides") or {}).items():
        extra[k] = yaml.safe_load(v) if isinstance(v, str) else v
    return variant_kwargs(model["name"], **extra)


def _run_norm(run_cfg: dict | None) -> tuple[tuple | None, tuple | None]:
    data = (run_cfg or {}).get("data")
    if not isinstance(data, dict):
        return None, None
    mean, std = data.get("mean"), data.get("std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


def _infer_mae_kwargs(mae_sd: dict) -> dict:
    """MaskedAutoencoder kwargs visible in the shapes of a MAE state dict (no head counts)."""
    from finetune.encoder_source import infer_encoder_cfg

    enc = infer_encoder_cfg({k[len("encoder."):]: v for k, v in mae_sd.items() if k.startswith("encoder.")})
    need = ("decoder_embed.weight", "decoder_pred.weight")
    missing = [k for k in need if k not in mae_sd]
    if missing:
        raise ConfigError(f"MAE checkpoint lacks {missing}")
    dec_dim = int(mae_sd["decoder_embed.weight"].shape[0])  # [Dd, D]
    depth = 1 + max((int(k.split(".")[1]) for k in mae_sd if k.startswith("decoder_blocks.")), default=-1)
    fc1 = mae_sd.get("decoder_blocks.0.mlp.fc1.weight")
    return dict(enc, decoder_embed_dim=dec_dim, decoder_depth=depth,
                decoder_mlp_ratio=(fc1.shape[0] / dec_dim) if fc1 is not None else 4.0)


def _build_mae(path: Path, sd: dict, fmt: str, cfg: VisualizeConfig) -> VisualModel:
    from models.convert import load_mae_weights, to_mae_state_dict
    from models.mae import MaskedAutoencoder
    from models.state_check import CheckpointMismatch
    from models.variants import MAE_VARIANTS, variant_kwargs

    mae_sd = to_mae_state_dict(sd)
    inferred = _infer_mae_kwargs(mae_sd)
    notes = []
    found = _find_run_config(path)
    run_cfg, where = found if found else (None, None)
    kwargs = _mae_kwargs_from_run(run_cfg) if run_cfg else None
    source = f"run config {where}" if kwargs else None
    from_run = kwargs is not None
    if kwargs is None and cfg.arch:
        if cfg.arch not in MAE_VARIANTS:
            raise ConfigError(f"arch={cfg.arch!r} is not an MAE variant ({', '.join(sorted(MAE_VARIANTS))}); "
                              "the checkpoint has a decoder, so it needs an MAE architecture")
        kwargs, source = variant_kwargs(cfg.arch, img_size=inferred["img_size"]), f"arch={cfg.arch}"
    if kwargs is None:
        kwargs = dict(inferred)
        kwargs["num_heads"] = max(1, inferred["embed_dim"] // 64)
        kwargs["decoder_num_heads"] = max(1, inferred["decoder_embed_dim"] // 32)
        source = "the weight shapes"
        if cfg.num_heads is None:
            notes.append(f"encoder heads not recorded: assumed embed_dim/64 = {kwargs['num_heads']} (set num_heads=)")
        if cfg.decoder_num_heads is None:
            notes.append(f"decoder heads not recorded: assumed decoder width/32 = {kwargs['decoder_num_heads']} "
                         "(set decoder_num_heads=)")
    if cfg.num_heads is not None:
        kwargs["num_heads"] = cfg.num_heads
    if cfg.decoder_num_heads is not None:
        kwargs["decoder_num_heads"] = cfg.decoder_num_heads
    if cfg.norm_pix_loss is not None:
        kwargs["norm_pix_loss"] = cfg.norm_pix_loss
    elif not (from_run and "norm_pix_loss" in kwargs):
        kwargs["norm_pix_loss"] = False
        notes.append("norm_pix_loss is not stored in weights: assumed false (set norm_pix_loss=true for norm-pix "
                     "checkpoints such as the official *_full.pth)")
    ctor = set(inspect.signature(MaskedAutoencoder.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in kwargs.items() if k in ctor}
    try:
        mae = MaskedAutoencoder(**kwargs)
        load_mae_weights(mae, sd, require_decoder=True)
    except (CheckpointMismatch, ValueError) as exc:
        raise ConfigError(f"{path}: the MAE weights do not fit the architecture from {source}: {exc}") from None
    mae.eval()
    mean, std = _run_norm(run_cfg)
    arch = {k: kwargs[k] for k in sorted(kwargs)}
    return VisualModel(mae.encoder, mae, "mae", str(path), fmt, arch, mean, std, notes)


def _has_cfg_metadata(path: Path) -> bool:
    """Whether a safetensors file records its architecture (save_encoder writes `encoder_cfg` into the metadata)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "encoder_cfg" in (f.metadata() or {})


def _build_encoder(path: Path, sd: dict, fmt: str, cfg: VisualizeConfig, kind: str = "encoder") -> VisualModel:
    from finetune.encoder_source import resolve_encoder
    from models.convert import to_encoder_state_dict
    from models.state_check import CheckpointMismatch, check_state_dict
    from models.vit import create_encoder

    src = resolve_encoder(str(path), arch=cfg.arch, num_heads=cfg.num_heads)
    enc_sd = to_encoder_state_dict(sd)
    avg_pool = "fc_norm.weight" in enc_sd and "norm.weight" not in enc_sd  # MAE fine-tuned global-pool layout
    encoder = create_encoder(**src.encoder_cfg, global_pool="avg" if avg_pool else "token")
    try:
        check_state_dict(encoder, enc_sd)
    except CheckpointMismatch as exc:
        raise ConfigError(f"{path}: the encoder weights do not fit {src.encoder_cfg}: {exc}") from None
    encoder.load_state_dict(enc_sd)
    notes = list(src.notes)
    found = _find_run_config(path)
    if cfg.num_heads is None and cfg.arch is None and found is None and not _has_cfg_metadata(path):
        notes.append(f"encoder heads not recorded: assumed embed_dim/64 = {src.encoder_cfg['num_heads']} "
                     "(set num_heads=)")
    mean, std = _run_norm(found[0] if found else None)
    if "head.weight" in sd or "fc_norm.weight" in sd:
        kind = "classifier"
    return VisualModel(encoder.eval(), None, kind, str(path), fmt, dict(src.encoder_cfg), mean, std, notes)


def _build_classifier(path: Path) -> VisualModel:
    from finetune.classifier_io import load_classifier

    model, meta = load_classifier(path)
    encoder = getattr(model, "encoder", model)  # probe: frozen encoder + head; vit: the whole timm model
    mean = tuple(meta["mean"]) if meta.get("mean") else None
    std = tuple(meta["std"]) if meta.get("std") else None
    return VisualModel(encoder.eval(), None, "classifier", str(path), "tessera-classifier",
                       dict(meta["encoder_cfg"]), mean, std)


def _build_timm(cfg: VisualizeConfig) -> VisualModel:
    import timm

    from finetune.encoder_source import resolve_encoder
    from models.state_check import CheckpointMismatch, check_state_dict

    name = cfg.checkpoint[len("timm:"):]
    src = resolve_encoder(cfg.checkpoint, weights=cfg.weights)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    try:
        check_state_dict(model, src.state_dict)
    except CheckpointMismatch as exc:
        raise ConfigError(f"{cfg.weights}: the weights do not fit timm's {name}: {exc}") from None
    model.load_state_dict(src.state_dict)
    cfg_data = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = cfg_data.get("mean"), cfg_data.get("std")
    return VisualModel(model.eval(), None, "timm", str(cfg.weights), "timm", dict(src.encoder_cfg),
                       tuple(mean) if mean else None, tuple(std) if std else None)


def _pick_in_run_dir(folder: Path) -> Path:
    """The weights a run folder stands for: its exported files, else the newest resumable checkpoint's model."""
    for name in ("classifier_best.safetensors", "classifier_last.safetensors", "mae.safetensors", "encoder.safetensors",
                 "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    saved = sorted([*folder.glob("*/model.safetensors"), *(folder / "checkpoints").glob("*/model.safetensors")],
                   key=lambda f: f.parent.name)  # step_000100, step_000200, ...
    if saved:
        return saved[-1]
    raise ConfigError(f"{folder} is a folder without weights: expected a pretraining run (mae.safetensors, "
                      "encoder.safetensors or checkpoints/*/model.safetensors) or a fine-tuning run "
                      "(classifier_best/last.safetensors)")


def load_visual_model(cfg: VisualizeConfig) -> VisualModel:
    """Read `cfg.checkpoint` into a VisualModel; every unusable checkpoint is a ConfigError saying what it is."""
    from models.convert import detect_format, load_state_dict

    spec = cfg.checkpoint
    if not spec:
        raise ConfigError("checkpoint= is required (a run directory, a weights file or timm:NAME)")
    if spec.startswith("timm:"):
        if not cfg.weights:
            raise ConfigError(f"checkpoint={spec} needs weights=/path/to/file (nothing is downloaded)")
        return _build_timm(cfg)
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (REPO / spec).exists():
        path = REPO / spec
    if path.is_dir():
        path = _pick_in_run_dir(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {spec}")
    if (path.parent / "classifier.json").is_file() and path.name.startswith("classifier"):
        return _build_classifier(path)
    try:
        sd = load_state_dict(path)
    except Exception as exc:  # corrupt file, not a checkpoint, pickled objects: say which file and what was expected
        raise ConfigError(f"cannot read {path} as a checkpoint: expected a .safetensors file or a torch state dict of "
                          f"a ViT encoder, MAE or classifier ({type(exc).__name__}: {exc})") from None
    try:
        fmt = detect_format(sd)
    except ValueError:
        raise ConfigError(f"{path} holds {len(sd)} tensors but is not a ViT encoder, MAE or classifier (keys like "
                          f"{sorted(sd)[:4]}; expected timm ViT names such as blocks.0.attn.qkv.weight)") from None
    from models.convert import to_mae_state_dict

    if any(k.startswith(_DECODER_PREFIXES) for k in to_mae_state_dict(sd)):
        return _build_mae(path, sd, fmt, cfg)
    return _build_encoder(path, sd, fmt, cfg)


def check_reconstruction_possible(model: VisualModel, cfg: VisualizeConfig) -> None:
    if cfg.reconstruction == "yes" and model.mae is None:
        what = {"encoder": "encoder-only weights", "classifier": "a classifier", "timm": "timm encoder weights"}
        raise ConfigError(
            f"reconstruction=yes, but {model.path} is {what.get(model.kind, model.kind)} ({model.fmt} format) without "
            "the MAE decoder (decoder_embed, decoder_blocks, decoder_pred), so nothing can be reconstructed. "
            "Expected a full MAE checkpoint: RUN_DIR/mae.safetensors from pretrain/mae.py, or an official "
            "*_full.pth / mae_visualize_*.pth; or set reconstruction=no")


# ------------------------------------------------------------------------------------------------- images


def _existing(spec: str) -> str:
    head = spec.split(":")[0]
    if spec and not Path(head).exists() and (REPO / head).exists():
        return str(REPO / spec)
    return spec


def load_images(spec: str, n: int, transform) -> tuple[torch.Tensor, list[str]]:
    """The first `n` images of `spec` (files, a folder of images, or a dataset spec), transformed: ([N,C,H,W], names)."""
    from PIL import Image, UnidentifiedImageError

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("images= is empty")
    files: list[Path] | None = None
    if all(p.lower().endswith(IMAGE_SUFFIXES) for p in parts):
        files = [Path(_existing(p)) for p in parts]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"image file(s) not found: {', '.join(missing)}")
    elif len(parts) == 1 and Path(_existing(parts[0])).is_dir() and not (Path(_existing(parts[0])) / "dataset.json").exists():
        folder = Path(_existing(parts[0]))
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if files is not None:
        tensors, names = [], []
        for f in files[:n]:
            try:
                with Image.open(f) as im:
                    tensors.append(transform(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                raise ConfigError(f"cannot read image {f}: {exc}") from None
            names.append(f.name)
        return torch.stack(tensors), names

    from data.eval_stream import build_eval_loader
    from data.info import DatasetError

    try:
        loader = build_eval_loader(_existing(parts[0]) if len(parts) == 1 else parts, batch_size=n,
                                   transform=transform, rank=0, world_size=1, num_workers=0)
        for batch in loader:
            images = batch["image"][batch["valid"]][:n].float()
            labels = batch["label"][batch["valid"]][:n].tolist()
            return images, [f"#{i} (label {lab})" for i, lab in enumerate(labels)]
    except DatasetError as exc:
        raise ConfigError(f"images={spec}: {exc}") from None
    raise ConfigError(f"images={spec}: the dataset is empty")


# ------------------------------------------------------------------------------------------------- drawing


def _select_layers(layers: tuple[int, ...], depth: int) -> list[int]:
    chosen = []
    for k in layers or range(depth):
        if not -depth <= k < depth:
            raise ConfigError(f"layer {k} does not exist: the encoder has {depth} blocks (0..{depth - 1}, or negative)")
        chosen.append(k % depth)
    return chosen


def attention_pictures(encoder, images: torch.Tensor, cfg: VisualizeConfig, mean, std, out_dir: Path) -> dict:
    """Capture the attention of every block on `images` and draw the layer, head and rollout overlays.

    Returns {"files": [...], "maps": {"block<k>": [N, rows, cols] mean over heads, "rollout": ...}}."""
    maps = capture_attention(encoder, images)  # depth x [N, heads, T, T]
    rows_cols = patch_grid(encoder, images)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    has_cls = getattr(encoder, "cls_token", None) is not None
    depth = len(maps)
    layers = _select_layers(cfg.layers, depth)
    per_layer = {k: cls_attention_maps(maps[k], rows_cols, prefix, has_cls).mean(dim=1) for k in layers}  # [N, r, c]
    rollout = rollout_cls_map(attention_rollout(maps, cfg.head_fusion), rows_cols, prefix, has_cls) if cfg.rollout else None

    pixels = denormalize(images, mean, std)  # [N, C, H, W] in [0, 1]
    factor = display_scale(pixels.shape[-2], pixels.shape[-1], cfg.display_size)
    bases = [upscale(to_pil(p), factor) for p in pixels]

    def draw(base, heat):
        return overlay(base, heat, cfg.alpha, cfg.colormap)

    files = []
    rows = []
    for i, base in enumerate(tqdm(bases, desc="attention maps", disable=len(bases) < 8)):
        row = [base] + [draw(base, per_layer[k][i]) for k in layers]
        if rollout is not None:
            row.append(draw(base, rollout[i]))
        rows.append(row)
    titles = ["image"] + [f"block {k}" for k in layers] + (["rollout"] if rollout is not None else [])
    files.append(save_png(grid(rows, col_labels=titles), out_dir / "attention_layers.png"))

    result = {"maps": {f"block{k}": per_layer[k] for k in layers}}
    if rollout is not None:
        result["maps"]["rollout"] = rollout
    if cfg.head_layer is not None:
        k = _select_layers((cfg.head_layer,), depth)[0]
        heads = cls_attention_maps(maps[k], rows_cols, prefix, has_cls)  # [N, heads, r, c]
        head_rows = [[base] + [draw(base, heads[i, h]) for h in range(heads.shape[1])] + [draw(base, heads[i].mean(0))]
                     for i, base in enumerate(bases)]
        titles = ["image"] + [f"head {h}" for h in range(heads.shape[1])] + ["mean"]
        files.append(save_png(grid(head_rows, col_labels=titles), out_dir / f"attention_heads_block{k}.png"))
        result["maps"][f"block{k}_heads"] = heads
    result["files"] = files
    return result


# ------------------------------------------------------------------------------------------------- main


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: VisualizeConfig) -> dict:
    """Everything `main` does, raising ConfigError for bad input; returns the summary (with the maps as tensors)."""
    from data.transforms import eval_transform

    model = load_visual_model(cfg)
    check_reconstruction_possible(model, cfg)
    mean = tuple(cfg.mean or model.mean or IMAGENET_MEAN)
    std = tuple(cfg.std or model.std or IMAGENET_STD)
    img_size = int(model.encoder.patch_embed.img_size[0])
    transform = eval_transform(img_size, mean, std, crop_pct=cfg.crop_pct)
    images, names = load_images(cfg.images, cfg.num_images, transform)
    device = _device(cfg.device)
    model.encoder.to(device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    files: list[Path] = []
    maps: dict = {}
    if cfg.attention:
        pics = attention_pictures(model.encoder, images.to(device), cfg, mean, std, out_dir)
        files += pics["files"]
        maps = pics["maps"]
    if model.mae is not None and cfg.reconstruction != "no":
        model.mae.to(device)
        files.append(save_reconstruction_grid(model.mae, images.to(device), out_dir / "reconstruction.png", mean, std,
                                              mask_ratio=cfg.mask_ratio, seed=cfg.seed))
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
    cfg = parse_cli(VisualizeConfig, argv, PROG)
    try:
        result = run(cfg)
    except ConfigError as exc:
        raise SystemExit(f"{PROG}: {exc}") from None
    print(f"{result['checkpoint']}: read as {result['read_as']} ({result['format']} format)")
    for note in result["notes"]:
        print(f"note: {note}")
    for f in result["files"]:
        print(f"wrote {f}")
    return result


if __name__ == "__main__":
    main()
