"""Weight interop: read official MAE, Hugging Face ViTMAE, timm and Tessera checkpoints; write timm-named encoders.

Library use: `load_state_dict(path)`, `detect_format(sd)`, `to_mae_state_dict(sd)`, `to_encoder_state_dict(sd)`,
`to_hf_state_dict(sd)`, `save_encoder(sd, path)`, `load_mae_weights(model, sd)`, `check_state_dict(model, sd)`,
`read_hf_config(dir)` (an HF ViTMAE config.json in our names, `layer_norm_eps` included: transformers' default is
1e-12, ours and the official MAE's 1e-6, and the facebook/vit-mae-* configs say 1e-12 for weights trained with 1e-6).
A directory of shards with an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`: HF sharded
saves, DeepSpeed's zero_to_fp32 ZeRO-3 consolidation) loads as one state dict.
Command line:
    python models/convert.py --input mae_pretrain_vit_base_full.pth --output encoder.safetensors [--to encoder|mae|hf]
The exported encoder loads with
    timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=0)
Nothing is unpickled beyond tensors and plain containers (`weights_only=True`, or safetensors).
A file the command line cannot read or recognise, or cannot write, is one line `models/convert.py: error: ...`
naming it, exit code 2 (the library functions raise as documented).
"""

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file, save_file

from models.hf_keys import hf_to_official, is_hf, official_to_hf
from models.state_check import CheckpointMismatch, check_state_dict

__all__ = ["load_state_dict", "detect_format", "to_official", "to_mae_state_dict", "to_encoder_state_dict",
           "to_hf_state_dict", "save_encoder", "load_mae_weights", "check_state_dict", "CheckpointMismatch",
           "read_hf_config", "OUR_LAYER_NORM_EPS", "main"]

FORMATS = ("tessera", "official", "hf", "timm")
_DECODER = ("decoder_", "mask_token")
_WRAPPERS = ("model", "state_dict", "module", "model_state")
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed wrappers, torch.compile
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OUR_LAYER_NORM_EPS = 1e-6  # models/vit.py and models/mae.py (the official MAE's); transformers' ViTMAE default: 1e-12
# HF ViTMAE config.json key -> our constructor argument (models/mae.py), for the plain ones
_HF_CONFIG = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
              "image_size": "img_size", "patch_size": "patch_size", "num_channels": "in_chans",
              "decoder_hidden_size": "decoder_embed_dim", "decoder_num_hidden_layers": "decoder_depth",
              "decoder_num_attention_heads": "decoder_num_heads", "layer_norm_eps": "layer_norm_eps",
              "qkv_bias": "qkv_bias", "hidden_act": "hidden_act", "norm_pix_loss": "norm_pix_loss",
              "mask_ratio": "mask_ratio"}


def read_hf_config(path) -> dict | None:
    """Architecture of an HF ViTMAE model directory (its config.json) under our names (`embed_dim`, `depth`,
    `num_heads`, `mlp_ratio`, `img_size`, `patch_size`, `in_chans`, `decoder_*`, `layer_norm_eps`, `qkv_bias`,
    `hidden_act`, `norm_pix_loss`, `mask_ratio`), or None when `path` is not a directory with a config.json.
    Raises ValueError for a config.json that is not a ViTMAE one."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {cfg_file}: {exc}") from None
    if hf.get("model_type") != "vit_mae":
        raise ValueError(f"{cfg_file} describes model_type {hf.get('model_type')!r}, not a ViTMAE model (vit_mae)")
    out = {ours: hf[theirs] for theirs, ours in _HF_CONFIG.items() if theirs in hf}
    for size in ("img_size", "patch_size"):
        if isinstance(out.get(size), (list, tuple)):
            out[size] = out[size][0] if len(set(out[size])) == 1 else tuple(out[size])
    if "intermediate_size" in hf and "hidden_size" in hf:
        out["mlp_ratio"] = hf["intermediate_size"] / hf["hidden_size"]
    if "decoder_intermediate_size" in hf and "decoder_hidden_size" in hf:
        out["decoder_mlp_ratio"] = hf["decoder_intermediate_size"] / hf["decoder_hidden_size"]
    out.setdefault("layer_norm_eps", 1e-12)  # transformers' ViTMAEConfig default
    return out


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Every shard an index file lists (`weight_map`: name -> shard file), merged into one state dict."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the shard index {index}: {exc}") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(load_state_dict(index.parent / shard))
    missing = sorted(set(_clean(dict.fromkeys(weight_map))) - set(sd))
    if missing:
        raise ValueError(f"{index} lists tensors its shards do not hold, e.g. {missing[0]}")
    return sd


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} dict from .safetensors, a torch file, or an HF model directory."""
    path = Path(path)
    index = next((path / n for n in _SHARD_INDEXES if (path / n).is_file()), None) if path.is_dir() else None
    if index is not None:
        return _load_sharded(index)
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "encoder.safetensors", "pytorch_model.bin")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            names = ", ".join(c.name for c in candidates)
            raise FileNotFoundError(f"no weights in directory {path} (looked for {names})")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _clean(load_file(str(path)))
    try:
        # argparse.Namespace is a plain attribute bag; the official trainer pickles its args into checkpoints.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds Python objects other than tensors and plain containers; refusing to "
                         f"unpickle it (weights_only=True). Re-save its state dict. Details: {err}") from None
    for _ in range(2):  # {"model": {...}} or {"state_dict": {"module": ...}}
        if isinstance(obj, dict):
            inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), dict)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    return _clean({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _clean(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def detect_format(sd: dict) -> str:
    """"tessera" (encoder.* + decoder_*), "hf" (ViTMAE), "official" (timm names + decoder_*) or "timm" (encoder)."""
    sd = _clean(sd)
    if "encoder.cls_token" in sd or any(k.startswith("encoder.blocks.") for k in sd):
        return "tessera"
    if is_hf(sd):
        return "hf"
    if any(k.startswith(_DECODER) for k in sd):
        return "official"
    if "cls_token" in sd or any(k.startswith("blocks.") for k in sd):
        return "timm"
    raise ValueError(f"unrecognised checkpoint layout; first keys: {sorted(sd)[:8]}")


def to_official(sd: dict) -> dict[str, torch.Tensor]:
    """Any supported format -> official MAE names (timm encoder names, decoder_* at top level)."""
    sd = _clean(sd)
    fmt = detect_format(sd)
    if fmt == "tessera":
        return {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in sd.items()}
    if fmt == "hf":
        return hf_to_official(sd)
    return dict(sd)


def to_mae_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """Any supported format -> MaskedAutoencoder keys (`encoder.<timm name>` + decoder_*)."""
    return {k if k.startswith(_DECODER) else f"encoder.{k}": v for k, v in to_official(sd).items()}


def to_encoder_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """Any supported format -> encoder weights under timm names (decoder, mask token and classifier head dropped)."""
    return {k: v for k, v in to_official(sd).items() if not k.startswith(_DECODER + ("head.", "head_dist."))}


def to_hf_state_dict(sd: dict, spelling: str = "v4") -> dict[str, torch.Tensor]:
    """Any supported format -> HF ViTMAEForPreTraining names ("v4": hub files; "v5": transformers 5 in memory)."""
    return official_to_hf(to_official(sd), spelling)


def save_weights(sd: dict, path, metadata: dict | None = None) -> Path:
    """Write a state dict as safetensors, atomically (a temporary file beside it, then renamed): a kill while writing
    leaves the previous file or none, never a partial one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_encoder(sd: dict, path, encoder_cfg: dict | None = None) -> Path:
    """Write encoder-only weights under timm key names as safetensors (encoder_cfg goes into the metadata)."""
    meta = {"format": "pt", "layout": "timm-vit-encoder"}
    if encoder_cfg is not None:
        meta["encoder_cfg"] = json.dumps(encoder_cfg)
    return save_weights(to_encoder_state_dict(sd), path, meta)


def load_mae_weights(model, sd: dict, require_decoder: bool = False) -> dict:
    """Load any supported checkpoint into a MaskedAutoencoder; encoder-only checkpoints keep the fresh decoder.

    Raises CheckpointMismatch naming each missing, unexpected or wrongly shaped key.
    """
    mae_sd = to_mae_state_dict(sd)
    has_decoder = any(k.startswith(_DECODER) for k in mae_sd)
    allow = () if (require_decoder or has_decoder) else ("decoder_*", "mask_token")
    report = check_state_dict(model, mae_sd, allow_missing=allow)
    model.load_state_dict(mae_sd, strict=False)
    return report


PROG = "models/convert.py"


def _refuse(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _why(exc: Exception) -> str:
    """One line for a reader's error: our own messages as they are, anything else with its type."""
    text = next((line for line in str(exc).splitlines() if line.strip()), "").strip()
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"not a checkpoint it can read ({type(exc).__name__}: {text or 'no details'})"


def _write(out: dict, out_path: Path, to: str, hf_cfg: dict | None) -> None:
    if to == "encoder" and out_path.suffix == ".safetensors":
        keep = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "layer_norm_eps")
        save_encoder(out, out_path, {k: hf_cfg[k] for k in keep if k in hf_cfg} if hf_cfg else None)
    elif out_path.suffix == ".safetensors":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, str(out_path), metadata={"format": "pt"})
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": out}, out_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="checkpoint: .pth/.pt/.bin, .safetensors or an HF model dir")
    ap.add_argument("--output", required=True, help="output file (.safetensors recommended)")
    ap.add_argument("--to", choices=("encoder", "mae", "hf"), default="encoder",
                    help="encoder: timm-named encoder; mae: Tessera MaskedAutoencoder keys; hf: HF ViTMAE hub names")
    args = ap.parse_args(argv)
    try:
        sd = load_state_dict(args.input)
        fmt = detect_format(sd)
        hf_cfg = read_hf_config(args.input) if Path(args.input).is_dir() else None
    except Exception as exc:  # noqa: BLE001 - whatever a reader raises on this file, the file is the cause
        _refuse(f"cannot convert {args.input}: {_why(exc)}; give a .safetensors, .pth/.pt/.bin file or an HF model "
                "directory holding MAE or ViT weights")
    if hf_cfg and hf_cfg["layer_norm_eps"] != OUR_LAYER_NORM_EPS:
        print(f"note: {args.input}/config.json has layer_norm_eps={hf_cfg['layer_norm_eps']:g}; Tessera's and timm's "
              f"MAE ViTs use {OUR_LAYER_NORM_EPS:g} (the official MAE's, which the facebook/vit-mae-* weights were "
              f"trained with); outputs differ from transformers' slightly")
    if args.to == "encoder":
        out = to_encoder_state_dict(sd)
    elif args.to == "mae":
        out = to_mae_state_dict(sd)
    else:
        out = to_hf_state_dict(sd, "v4")
    out_path = Path(args.output)
    try:
        _write(out, out_path, args.to, hf_cfg)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out_path) else ""
        _refuse(f"cannot write {out_path}: {exc.strerror or exc}{where}; choose another --output")
    n_params = sum(v.numel() for v in out.values())
    print(f"{args.input}: {fmt} format, {len(sd)} tensors -> {out_path} ({args.to}, {len(out)} tensors, "
          f"{n_params:,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
