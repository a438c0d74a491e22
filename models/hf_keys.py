"""Key mapping between Hugging Face ViTMAE state dicts and the official MAE / timm names.

HF spellings accepted (transformers' modeling_vit_mae, v4 and v5 layouts):
- v4 and hub files: `vit.encoder.layer.i.attention.attention.{query,key,value}`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense`, `...layernorm_{before,after}`; decoder `decoder.decoder_layers.j.*`;
- v5 in memory: `vit.layers.i.attention.{q,k,v,o}_proj`, `...mlp.fc{1,2}`;
- transformers 5.x `save_pretrained`: decoder layers as `decoder.decoder_encoder.layer.j.*` (v4 sub-names).
A bare `ViTMAEModel` (no `vit.` prefix) is accepted too. HF splits q/k/v; timm fuses them into one `qkv` Linear
whose rows are [q; k; v]. Keys this module does not recognise are passed through unchanged, so a later shape
check names them.
"""

import re

import torch

_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_DEC_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")

# HF module path inside a layer -> timm module path (or q/k/v part of timm's fused qkv)
_SUB = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV = {
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DEC_TOP = ("decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")


def is_hf(sd: dict) -> bool:
    return any(k in sd for k in ("vit.embeddings.cls_token", "embeddings.cls_token", "decoder.decoder_embed.weight"))


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAE(ForPreTraining|Model) state dict -> official MAE names (timm encoder names + decoder_*)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for key, value in sd.items():
        m = _LAYER.match(key)
        prefix = "blocks"
        if m is None:
            m = _DEC_LAYER.match(key)
            prefix = "decoder_blocks"
        if m is not None:
            idx, sub, param = m.groups()
            if sub in _SUB:
                out[f"{prefix}.{idx}.{_SUB[sub]}.{param}"] = value
                continue
            if sub in _QKV:
                parts = qkv.setdefault(f"{prefix}.{idx}.attn.qkv.{param}", [None, None, None])
                parts[_QKV[sub]] = value
                continue
        bare = key[len("vit."):] if key.startswith("vit.") else key
        if bare in _TOP:
            out[_TOP[bare]] = value
        elif key.startswith("decoder.") and key[len("decoder."):] in _DEC_TOP:
            out[key[len("decoder."):]] = value
        else:
            out[key] = value  # unknown: left for the shape check to report
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip("qkv", parts) if p is None]
            raise KeyError(f"HF state dict lacks the {'/'.join(missing)} part(s) of {name}")
        out[name] = torch.cat(parts, dim=0)  # [3D, D] or [3D]
    return out


def official_to_hf(sd: dict[str, torch.Tensor], spelling: str = "v4") -> dict[str, torch.Tensor]:
    """Official MAE names -> HF ViTMAEForPreTraining names: "v4" (hub files) or "v5" (transformers 5 in memory)."""
    if spelling not in ("v4", "v5"):
        raise ValueError(f"spelling must be 'v4' or 'v5', got {spelling!r}")
    v5 = spelling == "v5"
    sub = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj" if v5 else "attention.output.dense",
        "mlp.fc1": "mlp.fc1" if v5 else "intermediate.dense",
        "mlp.fc2": "mlp.fc2" if v5 else "output.dense",
    }
    qkv_names = (("attention.q_proj", "attention.k_proj", "attention.v_proj") if v5 else
                 ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
    top = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            group, idx, mod, param = m.groups()
            layer = (f"vit.layers.{idx}" if v5 else f"vit.encoder.layer.{idx}") if group == "blocks" \
                else f"decoder.decoder_layers.{idx}"
            if mod == "attn.qkv":
                for name, part in zip(qkv_names, value.chunk(3, dim=0)):
                    out[f"{layer}.{name}.{param}"] = part.clone()
            elif mod in sub:
                out[f"{layer}.{sub[mod]}.{param}"] = value
            else:
                raise KeyError(f"cannot express {key} in HF ViTMAE names")
        elif key in top:
            out[f"vit.{top[key]}"] = value
        elif key in _DEC_TOP:
            out[f"decoder.{key}"] = value
        else:
            raise KeyError(f"cannot express {key} in HF ViTMAE names")
    return out
