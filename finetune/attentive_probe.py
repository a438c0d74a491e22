"""The attentive probe: a learned query attends over the frozen encoder's patch tokens, then LayerNorm and a Linear.

As AIM's and V-JEPA's attentive probing: one learned query per image (multi-head cross-attention, keys and values
projected from the tokens), its attended vector normalised and classified. The attention is timm's
`AttentionPoolLatent` in its pre-logits mode (`out_features=0`): exactly the cross-attention, with no output
projection and without the residual MLP (with `out_features > 0` timm always adds `x + mlp(norm(x))`, which the
probe does not have). `q_proj=False`: the latent is the query itself, as AIM's (a projection of a learned constant is
redundant). LayerNorm and Linear follow here.

Tokens: the patch tokens after the encoder's final norm, without the CLS token (`include_cls=False`, the default, as
AIM attends over patch tokens: the probe then measures what the patch features hold, not what pretraining put into a
CLS token that MAE never trains directly). `include_cls=True` attends over CLS + patches.

Only the head trains; the encoder stays frozen in eval mode, as in `finetune/probe.py`'s `ProbeClassifier`, whose
interface `AttentiveProbeClassifier` matches (`.encoder`, `.head`, `.features(images)`, `forward(images)`), except
that its features are the tokens `[N, T, D]` (`launch.features.extract_tokens` caches the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent, trunc_normal_

from launch.features import patch_tokens


def default_num_heads(dim: int) -> int:
    """Heads of width 64 when `dim` allows it (ViT-Tiny 192: 3, ViT-B 768: 12), else one head."""
    return dim // 64 if dim >= 64 and dim % 64 == 0 else 1


class AttentiveProbeHead(nn.Module):
    """`[N, T, D]` tokens -> `[N, C]` logits: cross-attention from one learned query, LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None, qkv_bias: bool = True,
                 init_std: float = 0.02, head_init_std: float = 0.01, norm_eps: float = 1e-6) -> None:
        super().__init__()
        num_heads = num_heads or default_num_heads(dim)
        if dim % num_heads:
            raise ValueError(f"attentive probe: {num_heads} heads do not divide the token width {dim}")
        self.num_heads = num_heads
        self.pool = AttentionPoolLatent(dim, out_features=0, num_heads=num_heads, qkv_bias=qkv_bias, q_proj=False,
                                        latent_len=1, pool_type="token")
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.pool.latent, std=init_std)
        trunc_normal_(self.pool.kv.weight, std=init_std)
        if self.pool.kv.bias is not None:
            nn.init.zeros_(self.pool.kv.bias)
        trunc_normal_(self.fc.weight, std=head_init_std)
        nn.init.zeros_(self.fc.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype  # bf16 when DeepSpeed converted the head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(tokens.to(self.dtype))  # [N, T, D] -> [N, D]: the query's attended vector, heads joined
        return self.fc(self.norm(pooled))  # [N, C]


class AttentiveProbeClassifier(nn.Module):
    """`encoder` (timm VisionTransformer, frozen) + `head` (AttentiveProbeHead); `forward(images) -> logits [N, C]`.
    `features(images)` are the attended tokens `[N, T, D]` (no gradient), what the cached path stores."""

    def __init__(self, encoder: nn.Module, num_classes: int, include_cls: bool = False,
                 head: AttentiveProbeHead | None = None, num_heads: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.include_cls = include_cls
        self.head = head if head is not None else AttentiveProbeHead(encoder.embed_dim, num_classes, num_heads)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> AttentiveProbeClassifier:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return patch_tokens(self.encoder, images, include_prefix=self.include_cls)  # [N, T, D]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # [N, C]


def build_attentive_optimizer(head: nn.Module, lr: float = 0.0, weight_decay: float = 0.05,
                              betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the head's trainable parameters: weight decay on the matrices (key/value projection, classifier),
    none on biases, the LayerNorm and the learned query (a token, like a CLS token). `lr` is set by the loop's
    schedule (`launch.schedule.apply_lr`)."""
    decay, plain = [], []
    for name, p in head.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or name.endswith("latent") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


__all__ = ["AttentiveProbeHead", "AttentiveProbeClassifier", "build_attentive_optimizer", "default_num_heads"]
