"""Where a downstream run's encoder comes from: a file (ours or official), a timm model name, or random init.

`resolve_encoder(...)` returns the architecture (`encoder_cfg`, the keys of `models.vit.create_encoder`), the weights
under timm key names (None for `random`) and an identity string (file hash) that keys the feature cache. The
architecture is read from the checkpoint's shapes; only the head count is not visible in shapes, so it comes from
`num_heads=`, the safetensors metadata, the run's config.yaml beside the file, `arch=`, or dim/64, in that order.
When `arch=` is given, the checkpoint must fit it: a different width/depth/patch is an error naming the keys. The
input channel count (`in_chans`) always follows the weights (grayscale, RGB or N-channel pretraining).

Besides plain ViTs, `arch=` names hybrid ViTs (`models/hybrid.py`: timm's ResNet hybrids as `timm:NAME`, the 32 px
conv stems registered there, with or without `timm:`), whose encoder_cfg carries the timm name under `hybrid`, and
timm CNNs (`timm:resnet18`), encoder_cfg `{"cnn": NAME, ...}`, which train from scratch only (`encoder=random`; e.g.
a distillation teacher trained by finetune/classify.py). A hybrid's weights are checked against the architecture by
building it (its shapes do not tell the architecture the way a plain ViT's do).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launch.config import ConfigError
from models.vit import ENCODER_KEYS

# Head counts of published ViTs whose width is not 64 per head (ViT-H/14: 1280 wide, 16 heads).
_KNOWN_HEADS = {(1280, 32): 16}


@dataclass
class EncoderSource:
    spec: str
    encoder_cfg: dict
    state_dict: dict[str, torch.Tensor] | None
    identity: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"spec": self.spec, "identity": self.identity, "encoder_cfg": self.encoder_cfg}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def infer_encoder_cfg(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture visible in a timm-named encoder state dict (everything but the head count)."""
    need = ("patch_embed.proj.weight", "pos_embed")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConfigError(f"encoder checkpoint lacks {missing}; is it a ViT encoder? keys start with {sorted(sd)[:5]}")
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(sd["pos_embed"].shape[1])  # grid*grid + the prefix tokens (cls, and dist when distilled)
    prefix = int("cls_token" in sd) + int("dist_token" in sd)
    grid = math.isqrt(tokens - prefix)
    if grid * grid != tokens - prefix:
        raise ConfigError(f"pos_embed of {tokens} tokens is not a square grid (+{prefix} prefix); non-square encoders "
                          "need an explicit arch=")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise ConfigError("encoder checkpoint has no blocks.N.* keys")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if "blocks.0.mlp.fc1.weight" in sd else 4.0
    return {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": embed_dim,
            "depth": depth, "mlp_ratio": float(mlp_ratio)}


def arch_encoder_cfg(arch: str) -> dict:
    """Encoder architecture of an MAE variant name (`models.variants`), a hybrid registered in `models/hybrid.py`,
    or `timm:NAME` (a ViT, a hybrid ViT or a CNN)."""
    if arch.startswith("timm:"):
        return _timm_cfg(arch[len("timm:"):])
    from models.hybrid import HYBRID_MODULES, hybrid_encoder_cfg, is_hybrid
    from models.variants import MAE_VARIANTS

    if is_hybrid(arch):
        return hybrid_encoder_cfg(arch)
    if arch not in MAE_VARIANTS:
        import timm

        ours = ", ".join(timm.list_models(module=HYBRID_MODULES[-1]))
        raise ConfigError(f"arch={arch!r} is neither an MAE variant ({', '.join(sorted(MAE_VARIANTS))}), a hybrid "
                          f"({ours}) nor timm:NAME")
    kwargs = dict(MAE_VARIANTS[arch])
    if "encoder_cfg" in kwargs:
        return dict(kwargs["encoder_cfg"])
    return {k: kwargs[k] for k in ENCODER_KEYS if k in kwargs}


def _timm_cfg(name: str) -> dict:
    import timm

    from models.hybrid import hybrid_encoder_cfg, is_hybrid

    if is_hybrid(name):
        return hybrid_encoder_cfg(name)
    try:
        m = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError(f"timm has no model {name!r}: {exc}") from None
    if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
        if hasattr(m, "blocks") or hasattr(m, "patch_embed") or not hasattr(m, "get_classifier"):
            raise ConfigError(f"timm model {name!r} is neither a VisionTransformer, a hybrid ViT nor a CNN classifier")
        size = (getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        return {"cnn": name, "img_size": int(size[-1]), "in_chans": int(size[0])}
    pe = m.patch_embed
    return {"img_size": int(pe.img_size[0]), "patch_size": int(pe.patch_size[0]), "in_chans": int(pe.proj.in_channels),
            "embed_dim": int(m.embed_dim), "depth": len(m.blocks), "num_heads": int(m.blocks[0].attn.num_heads),
            "mlp_ratio": m.blocks[0].mlp.fc1.out_features / m.embed_dim}


def _heads_from_run_dir(path: Path) -> int | None:
    """The head count from a pretraining run's config.yaml beside the encoder file, when it names a variant."""
    cfg_file = path.parent / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        return None
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    if not isinstance(model, dict):
        return None
    if isinstance(model.get("num_heads"), int):
        return model["num_heads"]
    name = model.get("name") or model.get("variant")
    if isinstance(name, str):
        try:
            return arch_encoder_cfg(name).get("num_heads")
        except (ConfigError, ImportError):
            return None
    return None


def _heads_from_metadata(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("encoder_cfg", "config"):
        if key in meta:
            try:
                value = json.loads(meta[key])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and isinstance(value.get("num_heads"), int):
                return value["num_heads"]
    if meta.get("num_heads", "").isdigit():
        return int(meta["num_heads"])
    return None


def check_fits(cfg: dict, inferred: dict, where: str) -> None:
    """Error naming every architecture field where the checkpoint disagrees with the requested model."""
    bad = [f"{k}: model {cfg[k]} vs checkpoint {inferred[k]}" for k in ("patch_size", "in_chans", "embed_dim", "depth",
                                                                       "mlp_ratio")
           if k in cfg and k in inferred and float(cfg[k]) != float(inferred[k])]
    if bad:
        raise ConfigError(f"checkpoint {where} does not fit the model: " + "; ".join(bad))


def check_hybrid_fits(cfg: dict, sd: dict[str, torch.Tensor], where: str) -> None:
    """Error naming the keys where a checkpoint disagrees with the hybrid `cfg` describes (the position embedding
    may differ in grid: it is resampled on load; the head and final norms are not the encoder's)."""
    from models.classifier import create_backbone
    from models.state_check import CheckpointMismatch, check_state_dict

    body = {k: v for k, v in sd.items() if k != "pos_embed" and not k.startswith(("fc_norm.", "head"))}
    try:
        check_state_dict(create_backbone(cfg), body, allow_missing=("pos_embed", "norm"))
    except CheckpointMismatch as exc:
        detail = " ".join(str(exc).split("\n", 1)[-1].split())
        raise ConfigError(f"checkpoint {where} does not fit arch {cfg['hybrid']}: {detail[:600]}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from models import convert

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder file not found: {path}")
    try:
        sd = convert.load_state_dict(str(path))
    except Exception as exc:  # corrupt file, pickle, wrong format: say which file
        raise ConfigError(f"cannot read encoder checkpoint {path}: {exc}") from exc
    return convert.to_encoder_state_dict(sd)


def resolve_encoder(spec: str, *, weights: str | None = None, arch: str | None = None, num_heads: int | None = None,
                    seed: int = 0) -> EncoderSource:
    """Architecture + weights of `encoder=SPEC` (see module docstring)."""
    arch_cfg = arch_encoder_cfg(arch) if arch else None
    if spec == "random":
        if arch_cfg is None:
            raise ConfigError("encoder=random needs arch= (an MAE variant name or timm:NAME) to know the architecture")
        cfg = dict(arch_cfg)
        if num_heads:
            cfg["num_heads"] = num_heads
        return EncoderSource(spec, cfg, None, f"random:{arch}:{json.dumps(cfg, sort_keys=True)}:seed{seed}")

    if arch_cfg is not None and "cnn" in arch_cfg:
        raise ConfigError(f"arch={arch} is a CNN: CNNs train from scratch here (encoder=random arch={arch}); "
                          f"to learn from trained CNN weights, give them as a distillation teacher (distill.teacher=)")
    if spec.startswith("timm:"):
        cfg = _timm_cfg(spec[len("timm:"):])
        if "cnn" in cfg:
            raise ConfigError(f"encoder={spec} is a CNN, not a ViT encoder; CNNs train from scratch here "
                              f"(encoder=random arch={spec})")
        if weights is None:
            raise ConfigError(f"encoder={spec} needs encoder_weights=/path/to/weights (no downloads here); "
                              "or use encoder=random for an untrained baseline")
        sd = load_weights(weights)
        if "hybrid" in cfg:
            check_hybrid_fits(cfg, sd, str(weights))
        else:
            inferred = infer_encoder_cfg(sd)
            cfg["in_chans"] = inferred["in_chans"]  # the weights' channel count: 1, 3 or N-channel images
            check_fits(cfg, inferred, str(weights))
        return EncoderSource(spec, cfg, sd, f"sha256:{file_sha256(weights)}")

    path = Path(spec)
    sd = load_weights(path)
    if arch_cfg is not None and "hybrid" in arch_cfg:
        check_hybrid_fits(arch_cfg, sd, str(path))
        return EncoderSource(spec, dict(arch_cfg), sd, f"sha256:{file_sha256(path)}")
    if any(k.startswith("patch_embed.backbone.") for k in sd):
        raise ConfigError(f"{path} holds a hybrid ViT (patch_embed.backbone.* keys): give its architecture as arch= "
                          f"(e.g. arch=vit_tiny_convstem_p4_32 or arch=timm:vit_small_r26_s32_224)")
    inferred = infer_encoder_cfg(sd)
    if arch_cfg is not None:
        check_fits({**arch_cfg, "in_chans": inferred["in_chans"]}, inferred, str(path))
        cfg = dict(arch_cfg)
        cfg["img_size"], cfg["in_chans"] = inferred["img_size"], inferred["in_chans"]  # as the weights have them
    else:
        cfg = dict(inferred)
    notes = []
    heads = (num_heads or _heads_from_metadata(path) or _heads_from_run_dir(path)
             or (arch_cfg or {}).get("num_heads"))
    if not heads:
        heads = _KNOWN_HEADS.get((cfg["embed_dim"], cfg["depth"]), max(1, cfg["embed_dim"] // 64))
        notes.append(f"{path} does not say its head count; assuming num_heads={heads} (set arch= or num_heads=)")
    cfg["num_heads"] = int(heads)
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise ConfigError(f"num_heads={cfg['num_heads']} does not divide embed_dim={cfg['embed_dim']}")
    return EncoderSource(spec, cfg, sd, f"sha256:{file_sha256(path)}", notes)


__all__ = ["EncoderSource", "resolve_encoder", "infer_encoder_cfg", "arch_encoder_cfg", "check_fits",
           "check_hybrid_fits", "file_sha256", "load_weights"]
