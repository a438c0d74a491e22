"""The one reader of weights: a file, a run directory, `timm:NAME` + a weights file, or `random`, read as what the
caller asks for, with the architecture and the normalisation they were trained with.

    w = read_weights("runs/pretrain", want="encoder")          # encoder weights under timm names + encoder_cfg
    w = read_weights("runs/pretrain", want="pretrainer")       # the whole MAE/SimMIM/data2vec under our names
    w = read_weights("runs/finetune", want="classifier")       # a classifier and its classifier.json
    w = read_weights("mae_visualize_vit_base.pth", want="any") # whatever the file holds

Formats: ours (safetensors, `encoder.*` + decoder), the official MAE `.pth`, Hugging Face ViTMAE (a directory with
config.json), timm ViT weights, DeepSpeed's zero_to_fp32 output (a file, or shards with an index); keys are brought to
one layout by `models/convert.py`. Every file is read without executing code (safetensors, or `torch.load` with
`weights_only=True`). It alone knows the run directory's layout (`launch/run_files.py` names the files): a pretraining
run stands for its `mae|simmim|data2vec.safetensors` (or `encoder.safetensors`), a fine-tuning or probing run for its
`classifier_best.safetensors` (else `classifier_last`) with `classifier.json`, anything else with resumable
checkpoints for the newest checkpoint's `model.safetensors`.

The attention head count is not visible in weight shapes: it comes from `num_heads=`, the safetensors metadata, the
run's config.yaml, `arch=`, else width/64 (said in `notes`). Problems are a `WeightsError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import yaml

from core.errors import ConfigError, WeightsError
from launch import run_files
from models.arch import check_fits, default_heads, encoder_cfg_of_name, infer_encoder_cfg

Want = Literal["encoder", "pretrainer", "classifier", "any"]
_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class Weights:
    kind: str  # "random" | "encoder" | "pretrainer" | "classifier"
    source: str  # as given
    encoder_cfg: dict  # the encoder's architecture (models.vit keys with num_heads; a `hybrid` or `cnn` key otherwise)
    state_dict: dict[str, torch.Tensor] | None  # encoder: timm names; pretrainer: ours; classifier: as saved
    identity: str  # sha256 of the file(s), or the random init's description: keys the feature caches
    path: Path | None = None
    fmt: str = "tessera"  # models.convert.detect_format, "tessera-classifier" or "random"
    notes: list[str] = field(default_factory=list)
    run_config: dict | None = None  # the config.yaml of the run the weights belong to
    hf_config: dict | None = None  # models.convert.read_hf_config (an HF ViTMAE directory)
    meta: dict | None = None  # classifier.json

    def describe(self) -> dict:
        return {"spec": self.source, "identity": self.identity, "encoder_cfg": self.encoder_cfg}

    @property
    def norm(self) -> tuple[tuple | None, tuple | None]:
        """(mean, std) the weights were trained with, when recorded (classifier.json or the run's config.yaml)."""
        rec = self.meta or ((self.run_config or {}).get("data") if isinstance(self.run_config, dict) else None) or {}
        mean, std = rec.get("mean"), rec.get("std")
        return (tuple(mean) if mean else None), (tuple(std) if std else None)


# ------------------------------------------------------------------------------------------------ locating files


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return "sha256:" + h.hexdigest()


def run_config_of(path: Path) -> dict | None:
    """The config.yaml of the run a weights file belongs to: beside it, or up to two folders above
    (RUN/checkpoints/step_N/model.safetensors)."""
    for folder in (path if path.is_dir() else path.parent, *path.parents[:3]):
        f = folder / run_files.CONFIG
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text())
            except yaml.YAMLError:
                return None
            return data if isinstance(data, dict) else None
    return None


def classifier_file(folder: Path) -> Path | None:
    """A fine-tuning or probing run's classifier: classifier_best, else classifier_last (with classifier.json)."""
    if not (folder / run_files.CLASSIFIER_META).is_file():
        return None
    return next((folder / n for n in (run_files.CLASSIFIER_BEST, run_files.CLASSIFIER_LAST)
                 if (folder / n).is_file()), None)


def _in_folder(folder: Path, want: Want) -> Path:
    """The weights a folder stands for (see the module docstring)."""
    from models.convert import read_hf_config

    if want in ("classifier", "any", "encoder") and (found := classifier_file(folder)) is not None:
        return found
    if want == "classifier":
        raise WeightsError(f"{folder} holds no classifier ({run_files.CLASSIFIER_BEST} or {run_files.CLASSIFIER_LAST} "
                           f"beside {run_files.CLASSIFIER_META}): give a fine-tuning or probing run")
    try:
        if read_hf_config(folder) is not None:
            return folder  # an HF ViTMAE model directory
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    exports = [*run_files.PRETRAINER.values(), run_files.ENCODER]
    if want == "encoder":
        exports = [run_files.ENCODER, *run_files.PRETRAINER.values()]
    found = next((folder / n for n in exports if (folder / n).is_file()), None)
    if found is not None:
        return found
    if any((folder / n).is_file() for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                                            "model.safetensors", "pytorch_model.bin")):
        return folder  # shards with an index (zero_to_fp32), or one weights file under a standard name
    saved = sorted((folder / run_files.CHECKPOINTS).glob("step_*/model.safetensors"), key=lambda f: f.parent.name)
    if saved:
        return saved[-1]
    raise WeightsError(f"{folder} is a folder without weights: expected a pretraining run ({', '.join(exports)} or "
                       f"{run_files.CHECKPOINTS}/*/model.safetensors), a fine-tuning or probing run "
                       f"({run_files.CLASSIFIER_BEST} with {run_files.CLASSIFIER_META}), or an HF ViTMAE directory")


def _load(path: Path) -> dict[str, torch.Tensor]:
    from models import convert

    try:
        return convert.load_state_dict(path)
    except FileNotFoundError as exc:
        raise WeightsError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickled objects, wrong format: named for the user
        raise WeightsError(f"cannot read {path} as weights: expected a .safetensors file or a torch state dict "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                           ) from None


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pth", ".pt")) \
        if path.is_dir() else [path]


# ------------------------------------------------------------------------------------------------ head counts


def _heads_from_metadata(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("encoder_cfg", "config"):
        try:
            value = json.loads(meta[key]) if key in meta else None
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("num_heads"), int):
            return value["num_heads"]
    return int(meta["num_heads"]) if meta.get("num_heads", "").isdigit() else None


def recorded_variant(run_config: dict | None) -> dict | None:
    """MaskedAutoencoder kwargs of the variant a pretraining run's config.yaml names (with its overrides)."""
    from models.variants import MAE_VARIANTS, variant_kwargs

    model = (run_config or {}).get("model")
    if not isinstance(model, dict) or model.get("name") not in MAE_VARIANTS:
        return None
    extra = {k: model[k] for k in ("img_size", "mask_ratio", "mask_type", "norm_pix_loss") if model.get(k) is not None}
    for k, v in (model.get("overrides") or {}).items():
        extra[k] = yaml.safe_load(v) if isinstance(v, str) else v
    try:
        return variant_kwargs(model["name"], **extra)
    except (KeyError, TypeError):
        return None


def _encoder_heads(path: Path | None, run_config: dict | None, hf_config: dict | None, arch_cfg: dict | None,
                   num_heads: int | None) -> int | None:
    if num_heads:
        return num_heads
    if path is not None and (h := _heads_from_metadata(path)):
        return h
    for recorded in (recorded_variant(run_config), hf_config, arch_cfg):
        if recorded and isinstance(recorded.get("num_heads"), int):
            return recorded["num_heads"]
    return None


# ------------------------------------------------------------------------------------------------ reading


def read_weights(source: str, *, want: Want = "encoder", weights: str | None = None, arch: str | None = None,
                 num_heads: int | None = None, seed: int = 0) -> Weights:
    """Read `source` (see the module docstring) as `want`: "encoder" (timm-named encoder weights: the encoder part of
    any pretrainer or classifier), "pretrainer" (the whole pretraining model, our names), "classifier" (needs
    classifier.json) or "any" (what the source is). `weights`: the file of `timm:NAME`; `arch`: the architecture when
    the weights do not say (an MAE variant, a hybrid, timm:NAME); `random` needs `arch`."""
    from models import convert

    arch_cfg = encoder_cfg_of_name(arch) if arch else None
    if source == "pixels":  # raw pixels as the encoder: the probes' yardstick (models/pixel_encoder.py)
        if arch_cfg is None or "patch_size" not in arch_cfg:
            raise ConfigError("encoder=pixels needs arch= (a ViT name: its image size, patch size and channels shape "
                              "the pixel features)")
        cfg = {"pixels": True, **{k: arch_cfg[k] for k in ("img_size", "patch_size", "in_chans") if k in arch_cfg}}
        return Weights("pixels", source, cfg, None, f"pixels:{json.dumps(cfg, sort_keys=True)}", fmt="pixels")
    if source == "random":
        if arch_cfg is None:
            raise ConfigError("encoder=random needs arch= (an MAE variant name or timm:NAME) to know the architecture")
        cfg = dict(arch_cfg, **({"num_heads": num_heads} if num_heads else {}))
        return Weights("random", source, cfg, None, f"random:{arch}:{json.dumps(cfg, sort_keys=True)}:seed{seed}",
                       fmt="random")
    if arch_cfg is not None and "cnn" in arch_cfg:
        raise ConfigError(f"arch={arch} is a CNN: CNNs train from scratch here (encoder=random arch={arch}); to learn "
                          f"from trained CNN weights, give them as a distillation teacher (distill.teacher=)")
    if source.startswith("timm:"):
        return _read_timm(source, weights, num_heads)
    path = Path(source)
    if not path.exists():
        raise WeightsError(f"no such file or directory: {path}")
    if path.is_dir():
        path = _in_folder(path, want)
    if path.is_file() and path.name.startswith("classifier") and (path.parent / run_files.CLASSIFIER_META).is_file() \
            and want in ("classifier", "any"):
        return _read_classifier(source, path)
    if want == "classifier":
        raise WeightsError(f"{path} is not a classifier: expected {run_files.CLASSIFIER_BEST} (or a run directory) "
                           f"with {run_files.CLASSIFIER_META} beside it")
    sd = _load(path)
    try:
        fmt = convert.detect_format(sd)
    except ValueError:
        raise WeightsError(f"{path} holds {len(sd)} tensors but is not a ViT encoder, MAE or classifier (keys like "
                           f"{sorted(sd)[:4]}; expected timm ViT names such as blocks.0.attn.qkv.weight)") from None
    run_config = run_config_of(path)
    try:
        hf_config = convert.read_hf_config(path) if path.is_dir() else None
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    identity = _sha256(_files_of(path))
    mae_sd = sd if fmt == "tessera" else convert.to_mae_state_dict(sd)  # a SimMIM `head.*` is not a timm head
    kind = "pretrainer" if want == "pretrainer" or (want == "any" and _has_decoder(mae_sd)) else "encoder"
    enc_sd = convert.to_encoder_state_dict(sd)
    cfg, notes = _encoder_cfg(path, enc_sd, arch, arch_cfg, run_config, hf_config, num_heads)
    return Weights(kind, source, cfg, mae_sd if kind == "pretrainer" else enc_sd, identity, path, fmt, notes,
                   run_config, hf_config)


def _has_decoder(mae_sd: dict) -> bool:
    return any(k.startswith(_DECODER_PREFIXES) for k in mae_sd)


def _encoder_cfg(path: Path, enc_sd: dict, arch: str | None, arch_cfg: dict | None, run_config: dict | None,
                 hf_config: dict | None, num_heads: int | None) -> tuple[dict, list[str]]:
    """The encoder architecture of timm-named weights: from the shapes (checked against `arch` when given)."""
    if arch_cfg is not None and "hybrid" in arch_cfg:
        check_hybrid_fits(arch_cfg, enc_sd, str(path))
        return dict(arch_cfg), []
    if any(k.startswith("patch_embed.backbone.") for k in enc_sd):
        raise WeightsError(f"{path} holds a hybrid ViT (patch_embed.backbone.* keys): give its architecture as arch= "
                           f"(e.g. arch=vit_tiny_convstem_p4_32 or arch=timm:vit_small_r26_s32_224)")
    inferred = infer_encoder_cfg(enc_sd)
    if arch_cfg is not None:
        check_fits({**arch_cfg, "in_chans": inferred["in_chans"]}, inferred, str(path))
        cfg = dict(arch_cfg, img_size=inferred["img_size"], in_chans=inferred["in_chans"])  # as the weights have them
    else:
        cfg = dict(inferred)
    notes = []
    heads = _encoder_heads(path, run_config, hf_config, arch_cfg, num_heads)
    if not heads:
        heads = default_heads(cfg["embed_dim"], cfg["depth"])
        notes.append(f"{path} does not say its head count; assuming num_heads={heads} (set arch= or num_heads=)")
    cfg["num_heads"] = int(heads)
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise WeightsError(f"num_heads={cfg['num_heads']} does not divide embed_dim={cfg['embed_dim']} of {path}")
    return cfg, notes


def check_hybrid_fits(cfg: dict, sd: dict[str, torch.Tensor], where: str) -> None:
    """Error naming the keys where weights disagree with the hybrid `cfg` describes (the position embedding may differ
    in grid: it is resampled on load; the head and final norms are not the encoder's)."""
    from models.classifier import create_backbone
    from models.state_check import CheckpointMismatch, check_state_dict

    body = {k: v for k, v in sd.items() if k != "pos_embed" and not k.startswith(("fc_norm.", "head"))}
    try:
        check_state_dict(create_backbone(cfg), body, allow_missing=("pos_embed", "norm"))
    except CheckpointMismatch as exc:
        detail = " ".join(str(exc).split("\n", 1)[-1].split())
        raise WeightsError(f"{where} does not fit arch {cfg['hybrid']}: {detail[:600]}") from None


def _read_timm(source: str, weights: str | None, num_heads: int | None) -> Weights:
    from models import convert

    cfg = encoder_cfg_of_name(source)
    if "cnn" in cfg:
        raise ConfigError(f"encoder={source} is a CNN, not a ViT encoder; CNNs train from scratch here "
                          f"(encoder=random arch={source})")
    if weights is None:
        raise ConfigError(f"{source} needs a weights file (encoder_weights=/path/to/weights; no downloads here); or "
                          f"use encoder=random for an untrained baseline")
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    sd = convert.to_encoder_state_dict(_load(path))
    if "hybrid" in cfg:
        check_hybrid_fits(cfg, sd, str(path))
    else:
        inferred = infer_encoder_cfg(sd)
        cfg["in_chans"] = inferred["in_chans"]  # the weights' channel count: 1, 3 or N-channel images
        check_fits(cfg, inferred, str(path))
    if num_heads:
        cfg["num_heads"] = num_heads
    return Weights("encoder", source, cfg, sd, _sha256([path]), path, "timm")


def _read_classifier(source: str, path: Path) -> Weights:
    from safetensors.torch import load_file

    meta_path = path.parent / run_files.CLASSIFIER_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{meta_path} is unreadable: {exc}") from None
    for key in ("kind", "encoder_cfg", "num_classes"):
        if key not in meta:
            raise WeightsError(f"{meta_path} lacks '{key}'")
    try:
        sd = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, named for the user
        raise WeightsError(f"cannot read {path} as safetensors weights: {exc}") from None
    return Weights("classifier", source, dict(meta["encoder_cfg"]), sd, _sha256([path]), path, "tessera-classifier",
                   meta=meta)


# ------------------------------------------------------------------------------------------------ building models


def classifier_model(w: Weights) -> nn.Module:
    """The classifier `w` holds (read with want="classifier"), with its weights, in eval mode. Weights of the wrong
    shape are an error naming the keys."""
    from models.classifier import build_classifier_from_meta
    from models.state_check import CheckpointMismatch, check_state_dict

    try:
        model = build_classifier_from_meta(w.meta)
    except ValueError as exc:
        raise WeightsError(f"{w.path.parent / run_files.CLASSIFIER_META}: {exc}") from None
    try:
        check_state_dict(model, w.state_dict)
    except CheckpointMismatch as exc:
        raise WeightsError(f"{w.path} does not fit the model of its {run_files.CLASSIFIER_META}: "
                           f"{' '.join(str(exc).split())[:800]}") from None
    model.load_state_dict(w.state_dict)
    return model.eval()


def encoder_model(w: Weights, img_size: int | None = None) -> nn.Module:
    """A timm ViT (no head) with `w`'s encoder weights, at `img_size` (pos_embed interpolated when it differs)."""
    from models.classifier import create_backbone, load_encoder_into
    from models.vit import ENCODER_KEYS, create_encoder

    cfg = dict(w.encoder_cfg, **({"img_size": img_size} if img_size else {}))
    sd = w.state_dict
    if sd is not None and w.kind == "pretrainer":
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if sd is not None and "fc_norm.weight" in sd and "norm.weight" not in sd and "hybrid" not in cfg:
        # fine-tuned with global average pooling (MAE's layout): its fc_norm is the final norm
        encoder = create_encoder(**{k: v for k, v in cfg.items() if k in ENCODER_KEYS}, global_pool="avg")
    else:
        encoder = create_backbone(cfg)
    if sd is not None:
        load_encoder_into(encoder, sd)
    return encoder


def mae_model(w: Weights, *, arch: str | None = None, num_heads: int | None = None,
              decoder_num_heads: int | None = None, norm_pix_loss: bool | None = None) -> tuple[nn.Module, dict]:
    """The MaskedAutoencoder of pretrainer weights with a decoder, in eval mode, and its constructor kwargs. The
    decoder's architecture comes from the run's config.yaml, `arch=`, or the weight shapes (head counts and
    norm_pix_loss then assumed, and said in `w.notes`)."""
    import inspect

    from models.arch import decoder_cfg_of
    from models.convert import load_mae_weights
    from models.mae import MaskedAutoencoder
    from models.state_check import CheckpointMismatch
    from models.variants import MAE_VARIANTS, variant_kwargs

    shapes = {**{k: w.encoder_cfg[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                               "mlp_ratio")}, **decoder_cfg_of(w.state_dict)}
    kwargs, source = recorded_variant(w.run_config), "the run's config.yaml"
    from_run = kwargs is not None
    if kwargs is None and arch:
        if arch not in MAE_VARIANTS:
            raise ConfigError(f"arch={arch!r} is not an MAE variant ({', '.join(sorted(MAE_VARIANTS))}); the "
                              "weights have a decoder, so they need an MAE architecture")
        kwargs, source = variant_kwargs(arch, img_size=shapes["img_size"]), f"arch={arch}"
    if kwargs is None:
        kwargs, source = dict(shapes), "the weight shapes"
        kwargs["num_heads"] = w.encoder_cfg["num_heads"]
        kwargs["decoder_num_heads"] = max(1, shapes["decoder_embed_dim"] // 32)
        if decoder_num_heads is None:
            w.notes.append(f"decoder heads not recorded: assumed decoder width/32 = {kwargs['decoder_num_heads']} "
                           "(set decoder_num_heads=)")
    for key, value in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads),
                       ("norm_pix_loss", norm_pix_loss)):
        if value is not None:
            kwargs[key] = value
    if norm_pix_loss is None and not (from_run and "norm_pix_loss" in kwargs):
        kwargs["norm_pix_loss"] = False
        w.notes.append("norm_pix_loss is not stored in weights: assumed false (set norm_pix_loss=true for norm-pix "
                       "checkpoints such as the official *_full.pth)")
    ctor = set(inspect.signature(MaskedAutoencoder.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in kwargs.items() if k in ctor}
    try:
        mae = MaskedAutoencoder(**kwargs)
        load_mae_weights(mae, w.state_dict, require_decoder=True)
    except (CheckpointMismatch, ValueError) as exc:
        raise WeightsError(f"{w.path}: the MAE weights do not fit the architecture from {source}: {exc}") from None
    return mae.eval(), dict(sorted(kwargs.items()))


def timm_classifier(name: str, weights: str | None, num_classes: int, key: str) -> tuple[nn.Module, dict]:
    """timm's `name` with its classifier head for `num_classes`, weights from `weights` (no downloads); and its
    pretrained_cfg (mean, std, input size). `key` names the config key for messages."""
    import timm

    import models.hybrid  # noqa: F401  (registers the conv-stem hybrids as timm models)

    if not weights:
        raise ConfigError(f"{key}=timm:{name} needs a weights file (no downloads here)")
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if name not in timm.list_models():
        raise ConfigError(f"{key}=timm:{name}: timm has no model of that name")
    try:
        # num_classes in the overlay too: else timm drops the file's head as belonging to another class count
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot load timm:{name} from {path} with {num_classes} classes: {first}") from None
    return model, dict(model.pretrained_cfg)


__all__ = ["Weights", "read_weights", "classifier_model", "encoder_model", "mae_model", "timm_classifier",
           "run_config_of", "recorded_variant", "classifier_file", "check_hybrid_fits"]
