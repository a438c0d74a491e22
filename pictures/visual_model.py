"""What a checkpoint is read as for pictures: the ViT encoder to draw attention from, and the MAE when the checkpoint
has a decoder to reconstruct with.

Reading goes through the project's own loaders: `finetune.classifier_io` for classifiers saved with classifier.json,
`finetune.encoder_source.resolve_encoder` for encoder weights and `timm:NAME` (architecture from the shapes, head
count from num_heads=/metadata/run config/arch=), `models.convert` for the key layouts (ours, official MAE, HF, timm).
What is added here is the MAE's decoder: its architecture comes from the pretraining run's config.yaml, `arch=`, or
the decoder's weight shapes (head counts and norm_pix_loss then assumed, and said so in `notes`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from finetune.classifier_io import META_NAME, load_classifier, resolve_checkpoint
from finetune.encoder_source import infer_encoder_cfg, resolve_encoder
from launch.config import ConfigError
from pictures.image_input import existing_path

_DECODER_PREFIXES = ("decoder_", "mask_token")
_PRETRAIN_EXPORTS = ("mae.safetensors", "encoder.safetensors", "model.safetensors")


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


def find_run_config(path: Path) -> dict | None:
    """The config.yaml of the run a weights file belongs to: beside it, or up to two folders above
    (RUN/checkpoints/step_N/model.safetensors)."""
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        f = folder / "config.yaml"
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text())
            except yaml.YAMLError:
                return None
            return data if isinstance(data, dict) else None
    return None


def _run_norm(run_cfg: dict | None) -> tuple[tuple | None, tuple | None]:
    data = (run_cfg or {}).get("data")
    if not isinstance(data, dict):
        return None, None
    mean, std = data.get("mean"), data.get("std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


def _mae_kwargs_from_run(run_cfg: dict | None) -> dict | None:
    """MaskedAutoencoder kwargs from a pretraining config.yaml (`model.name` + its overrides), if it names a variant."""
    from models.variants import MAE_VARIANTS, variant_kwargs

    model = (run_cfg or {}).get("model")
    if not isinstance(model, dict) or model.get("name") not in MAE_VARIANTS:
        return None
    extra = {k: model[k] for k in ("img_size", "mask_ratio", "mask_type", "norm_pix_loss") if k in model}
    for k, v in (model.get("overrides") or {}).items():
        extra[k] = yaml.safe_load(v) if isinstance(v, str) else v
    return variant_kwargs(model["name"], **extra)


def _decoder_shape_kwargs(mae_sd: dict) -> dict:
    """MaskedAutoencoder kwargs visible in the shapes of a MAE state dict (no head counts)."""
    enc = infer_encoder_cfg({k[len("encoder."):]: v for k, v in mae_sd.items() if k.startswith("encoder.")})
    missing = [k for k in ("decoder_embed.weight", "decoder_pred.weight") if k not in mae_sd]
    if missing:
        raise ConfigError(f"MAE checkpoint lacks {missing}")
    dec_dim = int(mae_sd["decoder_embed.weight"].shape[0])  # [Dd, D]
    depth = 1 + max((int(k.split(".")[1]) for k in mae_sd if k.startswith("decoder_blocks.")), default=-1)
    fc1 = mae_sd.get("decoder_blocks.0.mlp.fc1.weight")
    return dict(enc, decoder_embed_dim=dec_dim, decoder_depth=depth,
                decoder_mlp_ratio=(fc1.shape[0] / dec_dim) if fc1 is not None else 4.0)


def _read_mae(path: Path, sd: dict, fmt: str, *, arch, num_heads, decoder_num_heads, norm_pix_loss) -> VisualModel:
    from models.convert import load_mae_weights, to_mae_state_dict
    from models.mae import MaskedAutoencoder
    from models.state_check import CheckpointMismatch
    from models.variants import MAE_VARIANTS, variant_kwargs

    shapes = _decoder_shape_kwargs(to_mae_state_dict(sd))
    notes = []
    run_cfg = find_run_config(path)
    kwargs = _mae_kwargs_from_run(run_cfg)
    from_run, source = kwargs is not None, "the run's config.yaml"
    if kwargs is None and arch:
        if arch not in MAE_VARIANTS:
            raise ConfigError(f"arch={arch!r} is not an MAE variant ({', '.join(sorted(MAE_VARIANTS))}); "
                              "the checkpoint has a decoder, so it needs an MAE architecture")
        kwargs, source = variant_kwargs(arch, img_size=shapes["img_size"]), f"arch={arch}"
    if kwargs is None:
        kwargs, source = dict(shapes), "the weight shapes"
        kwargs["num_heads"] = max(1, shapes["embed_dim"] // 64)
        kwargs["decoder_num_heads"] = max(1, shapes["decoder_embed_dim"] // 32)
        if num_heads is None:
            notes.append(f"encoder heads not recorded: assumed embed_dim/64 = {kwargs['num_heads']} (set num_heads=)")
        if decoder_num_heads is None:
            notes.append(f"decoder heads not recorded: assumed decoder width/32 = {kwargs['decoder_num_heads']} "
                         "(set decoder_num_heads=)")
    if num_heads is not None:
        kwargs["num_heads"] = num_heads
    if decoder_num_heads is not None:
        kwargs["decoder_num_heads"] = decoder_num_heads
    if norm_pix_loss is not None:
        kwargs["norm_pix_loss"] = norm_pix_loss
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
    return VisualModel(mae.encoder, mae, "mae", str(path), fmt, dict(sorted(kwargs.items())), mean, std, notes)


def _read_encoder(path: Path, sd: dict, fmt: str, *, arch, num_heads) -> VisualModel:
    from models.state_check import CheckpointMismatch, check_state_dict
    from models.vit import create_encoder

    src = resolve_encoder(str(path), arch=arch, num_heads=num_heads)
    enc_sd = src.state_dict  # timm names, head dropped
    avg_pool = "fc_norm.weight" in enc_sd and "norm.weight" not in enc_sd  # MAE fine-tuned global-pool layout
    encoder = create_encoder(**src.encoder_cfg, global_pool="avg" if avg_pool else "token")
    try:
        check_state_dict(encoder, enc_sd)
    except CheckpointMismatch as exc:
        raise ConfigError(f"{path}: the encoder weights do not fit {src.encoder_cfg}: {exc}") from None
    encoder.load_state_dict(enc_sd)
    kind = "classifier" if "head.weight" in sd or "fc_norm.weight" in sd else "encoder"
    mean, std = _run_norm(find_run_config(path))
    return VisualModel(encoder.eval(), None, kind, str(path), fmt, dict(src.encoder_cfg), mean, std, list(src.notes))


def _read_classifier(path: Path) -> VisualModel:
    model, meta = load_classifier(path)
    encoder = getattr(model, "encoder", model)  # probe: frozen encoder + head; vit: the whole timm model
    mean = tuple(meta["mean"]) if meta.get("mean") else None
    std = tuple(meta["std"]) if meta.get("std") else None
    return VisualModel(encoder.eval(), None, "classifier", str(path), "tessera-classifier",
                       dict(meta["encoder_cfg"]), mean, std)


def _read_timm(name: str, weights: str) -> VisualModel:
    import timm

    from models.state_check import CheckpointMismatch, check_state_dict

    src = resolve_encoder(f"timm:{name}", weights=weights)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    try:
        check_state_dict(model, src.state_dict)
    except CheckpointMismatch as exc:
        raise ConfigError(f"{weights}: the weights do not fit timm's {name}: {exc}") from None
    model.load_state_dict(src.state_dict)
    cfg_data = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = cfg_data.get("mean"), cfg_data.get("std")
    return VisualModel(model.eval(), None, "timm", str(weights), "timm", dict(src.encoder_cfg),
                       tuple(mean) if mean else None, tuple(std) if std else None)


def weights_in_folder(folder: Path) -> Path:
    """The weights a run folder stands for: a fine-tuning run's classifier, a pretraining run's exports, else the
    newest resumable checkpoint's model."""
    try:
        return resolve_checkpoint(folder)  # classifier_best/last.safetensors
    except ConfigError:
        pass
    for name in _PRETRAIN_EXPORTS:
        if (folder / name).is_file():
            return folder / name
    saved = sorted([*folder.glob("*/model.safetensors"), *(folder / "checkpoints").glob("*/model.safetensors")],
                   key=lambda f: f.parent.name)  # step_000100, step_000200, ...
    if saved:
        return saved[-1]
    raise ConfigError(f"{folder} is a folder without weights: expected a pretraining run (mae.safetensors, "
                      "encoder.safetensors or checkpoints/*/model.safetensors) or a fine-tuning run "
                      "(classifier_best/last.safetensors)")


def load_visual_model(checkpoint: str, *, weights: str | None = None, arch: str | None = None,
                      num_heads: int | None = None, decoder_num_heads: int | None = None,
                      norm_pix_loss: bool | None = None) -> VisualModel:
    """Read `checkpoint` (run folder, weights file, or timm:NAME with `weights`); every unusable checkpoint is a
    ConfigError saying what it is and what was expected."""
    from models.convert import detect_format, load_state_dict, to_mae_state_dict

    if not checkpoint:
        raise ConfigError("checkpoint= is required (a run directory, a weights file or timm:NAME)")
    if checkpoint.startswith("timm:"):
        if not weights:
            raise ConfigError(f"checkpoint={checkpoint} needs weights=/path/to/file (nothing is downloaded)")
        return _read_timm(checkpoint[len("timm:"):], weights)
    path = Path(existing_path(checkpoint))
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    if path.name.startswith("classifier") and (path.parent / META_NAME).is_file():
        return _read_classifier(path)
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
    if any(k.startswith(_DECODER_PREFIXES) for k in to_mae_state_dict(sd)):
        return _read_mae(path, sd, fmt, arch=arch, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                         norm_pix_loss=norm_pix_loss)
    return _read_encoder(path, sd, fmt, arch=arch, num_heads=num_heads)


def check_reconstruction_possible(model: VisualModel, reconstruction: str) -> None:
    """reconstruction="yes" needs an MAE decoder; the error names what the checkpoint is instead."""
    if reconstruction == "yes" and model.mae is None:
        what = {"encoder": "encoder-only weights", "classifier": "a classifier", "timm": "timm encoder weights"}
        raise ConfigError(
            f"reconstruction=yes, but {model.path} is {what.get(model.kind, model.kind)} ({model.fmt} format) without "
            "the MAE decoder (decoder_embed, decoder_blocks, decoder_pred), so nothing can be reconstructed. "
            "Expected a full MAE checkpoint: RUN_DIR/mae.safetensors from pretrain/mae.py, or an official "
            "*_full.pth / mae_visualize_*.pth; or set reconstruction=no")
