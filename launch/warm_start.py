"""Continued pretraining: the starting weights of a new run (`model.init_from=`), with a fresh optimizer and schedule.

Sources (`find_weights`): a Tessera run directory (its `mae.safetensors`, `simmim.safetensors` or
`data2vec.safetensors`, else `encoder.safetensors`) or one of those files; a ZeRO-3 consolidation (DeepSpeed's
zero_to_fp32 output: a file, or a directory of shards with an index); an official MAE `.pth`; a Hugging Face ViTMAE
directory (weights + config.json); timm ViT weights (a classifier head is dropped). Keys are brought to the model's
names by `models/convert.py`.

What loads (`warm_start`): the encoder always, every tensor of it, shapes equal; the rest of the model (MAE's decoder,
a SimMIM/data2vec head) when the checkpoint has all of it with the same shapes, else that part starts fresh and the
summary line says so. A disagreement is one line naming the key and both shapes. What shapes do not show is checked
where the source records it: head counts (HF config.json, a run's config.yaml) and the LayerNorm epsilon of an HF
config.json (transformers' default 1e-12 vs our 1e-6; `model.layer_norm_eps` settles it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from launch.config import ConfigError

RUN_WEIGHTS = ("mae.safetensors", "simmim.safetensors", "data2vec.safetensors", "encoder.safetensors")
ENCODER = "encoder."
IGNORED_ENCODER = ("encoder.head.", "encoder.fc_norm.", "encoder.head_drop.")  # a timm classifier's, not the encoder's


@dataclass
class InitSource:
    path: Path  # the weights file or directory read
    state_dict: dict[str, torch.Tensor]  # under the model's names (encoder.*, decoder_*, mask_token, head.*)
    fmt: str  # models.convert.detect_format
    hf_config: dict | None = None  # models.convert.read_hf_config
    run_model: dict | None = None  # the `model` section of a Tessera run's config.yaml


def _run_model_section(folder: Path) -> dict | None:
    import yaml

    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        model = (yaml.safe_load(cfg_file.read_text()) or {}).get("model")
    except (yaml.YAMLError, AttributeError):
        return None
    return model if isinstance(model, dict) else None


def find_weights(spec: str) -> InitSource:
    """Read `model.init_from=spec` (see the module docstring); ConfigError naming the path when it cannot."""
    from models import convert

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"model.init_from: no such file or directory: {path}")
    run_model, hf_config = None, None
    if path.is_dir():
        try:
            hf_config = convert.read_hf_config(path)
        except ValueError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
        found = next((path / n for n in RUN_WEIGHTS if (path / n).is_file()), None)
        if found is not None and hf_config is None:  # a Tessera run directory
            run_model, path = _run_model_section(path), found
    elif path.name in RUN_WEIGHTS:
        run_model = _run_model_section(path.parent)
    try:
        sd = convert.load_state_dict(path)
        fmt = convert.detect_format(sd)
    except FileNotFoundError as exc:
        raise ConfigError(f"model.init_from: {exc} (a run directory needs one of {', '.join(RUN_WEIGHTS)})") from None
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ConfigError(f"model.init_from: cannot read weights from {path}: {exc}") from None
    # our own files keep our names (a SimMIM `head.*` is not a timm head); the others are converted
    sd = sd if fmt == "tessera" else convert.to_mae_state_dict(sd)
    return InitSource(path, sd, fmt, hf_config, run_model)


def layer_norm_eps(model: nn.Module) -> float | None:
    return next((m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)), None)


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    """The epsilon of every LayerNorm of the model (encoder and decoder)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def _heads(model: nn.Module) -> tuple[int | None, int | None]:
    enc = model.encoder.blocks[0].attn.num_heads
    dec = model.decoder_blocks[0].attn.num_heads if len(getattr(model, "decoder_blocks", ())) else None
    return enc, dec


def _check_recorded(model: nn.Module, src: InitSource, eps_given: bool) -> None:
    """What shapes do not show: head counts and (HF) the LayerNorm epsilon."""
    recorded = dict(src.hf_config or {})
    if src.run_model and src.run_model.get("name"):
        from models.variants import variant_kwargs

        try:
            overrides = src.run_model.get("overrides") or {}
            recorded = {k: v for k, v in variant_kwargs(src.run_model["name"], **overrides).items()
                        if k in ("num_heads", "decoder_num_heads")}
        except (KeyError, TypeError):
            recorded = {}
    enc, dec = _heads(model)
    for key, ours in (("num_heads", enc), ("decoder_num_heads", dec)):
        theirs = recorded.get(key)
        if ours is not None and theirs is not None and int(theirs) != ours:
            where = "model.overrides.num_heads" if key == "num_heads" else "model.overrides.decoder_num_heads"
            raise ConfigError(f"model.init_from={src.path}: the checkpoint has {key}={theirs} but the model {ours} "
                              f"(set {where}={theirs})")
    eps = (src.hf_config or {}).get("layer_norm_eps")
    if eps is not None and not eps_given and eps != layer_norm_eps(model):
        raise ConfigError(
            f"model.init_from={src.path}: its config.json says layer_norm_eps={eps:g} but the model uses "
            f"{layer_norm_eps(model):g}; choose one: model.layer_norm_eps={eps:g} (the checkpoint's numerics) or "
            f"model.layer_norm_eps={layer_norm_eps(model):g} (right for facebook/vit-mae-*, trained with 1e-6 "
            f"although their config.json says 1e-12)")


def _fit(model_sd: dict, sd: dict, keys: list[str]) -> list[str]:
    """The keys of `keys` whose shapes differ between model and checkpoint (missing ones count), as text."""
    bad = []
    for k in keys:
        if k not in sd:
            bad.append(f"{k} missing from the checkpoint (model {list(model_sd[k].shape)})")
        elif tuple(sd[k].shape) != tuple(model_sd[k].shape):
            bad.append(f"{k}: checkpoint {list(sd[k].shape)} vs model {list(model_sd[k].shape)}")
    return bad


def warm_start(model: nn.Module, spec: str, eps: float | None = None) -> str:
    """Load `spec` into `model` (see the module docstring) and return one line saying what was loaded. `eps`: the
    LayerNorm epsilon the user chose (`model.layer_norm_eps`), applied to the model; None: keep the model's."""
    src = find_weights(spec)
    if eps is not None:
        set_layer_norm_eps(model, eps)
    _check_recorded(model, src, eps_given=eps is not None)
    own = model.state_dict()
    sd = {k: v for k, v in src.state_dict.items() if not k.startswith(IGNORED_ENCODER)}
    encoder_keys = [k for k in own if k.startswith(ENCODER)]
    bad = _fit(own, sd, encoder_keys)
    extra = sorted(k for k in sd if k.startswith(ENCODER) and k not in own)
    bad += [f"{k} {list(sd[k].shape)} is not in the model" for k in extra]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"model.init_from={src.path} does not fit the model: {bad[0]}{more}; set model.name, "
                          f"model.img_size or model.overrides.* to the checkpoint's architecture")
    rest = [k for k in own if not k.startswith(ENCODER)]
    rest_bad = _fit(own, sd, rest)
    has_decoder = any(k.startswith("decoder_") for k in sd)
    if has_decoder and any(k.startswith("decoder_") for k in rest) and rest_bad:
        raise ConfigError(f"model.init_from={src.path}: its decoder does not fit the model's: {rest_bad[0]}; set "
                          f"model.overrides.decoder_* to the checkpoint's decoder")
    load = encoder_keys + ([] if rest_bad or not rest else rest)
    with torch.no_grad():
        for k in load:
            own[k].copy_(sd[k].to(own[k].dtype))
    unused = sorted({k.split(".")[0] for k in sd if k not in own})
    part = "decoder" if any(k.startswith("decoder_") for k in rest) else "head"
    what = "encoder" if not rest else f"encoder + {part}" if not rest_bad else f"encoder ({part} starts fresh)"
    return (f"init        {src.path} ({src.fmt} format): {what}, {len(load)} tensors"
            + (f"; not used: {', '.join(unused)}" if unused else ""))


__all__ = ["InitSource", "find_weights", "warm_start", "set_layer_norm_eps", "layer_norm_eps", "RUN_WEIGHTS"]
