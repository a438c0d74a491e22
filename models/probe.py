"""The probes' models: a frozen encoder and a small trained head (`finetune/linprobe.py`, `probe.head=`).

* linear (`ProbeClassifier`): a pooled feature, BatchNorm1d without affine, one Linear, as in the MAE recipe: the
  BatchNorm (eps 1e-6, no affine) only calibrates the feature scale, so one learning rate fits every encoder; the
  Linear starts from trunc-normal std 0.01 and zero bias (trained by LARS).
* attentive (`AttentiveProbeClassifier`), as AIM's and V-JEPA's attentive probing: one learned query attends over the
  frozen encoder's patch tokens (multi-head cross-attention, keys and values projected from the tokens), its attended
  vector normalised (LayerNorm) and classified (Linear) (trained by AdamW). The attention is timm's
  `AttentionPoolLatent` in its pre-logits mode (`out_features=0`): exactly the cross-attention, with no output
  projection and without the residual MLP (with `out_features > 0` timm always adds `x + mlp(norm(x))`, which the
  probe does not have). `q_proj=False`: the latent is the query itself, as AIM's. Tokens: the patch tokens after the
  encoder's final norm, without the CLS token by default (`include_cls=False`, as AIM: MAE never trains CLS directly).

Only the head trains; the encoder stays in eval mode with gradients off, whatever `.train()` is called on the whole.
`features(images)` is what the cached paths store: the pooled feature [N, D], or the tokens [N, T, D].
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent, trunc_normal_

from models.pooling import encode, patch_tokens


class ProbeHead(nn.Sequential):
    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self[1].weight, std=init_std)
        nn.init.zeros_(self[1].bias)


class ProbeClassifier(nn.Module):
    """`encoder` (timm VisionTransformer, frozen) + `head` (ProbeHead); `forward(images) -> logits [N, C]`."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "token",
                 head: ProbeHead | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = head if head is not None else ProbeHead(getattr(encoder, "feature_dim", encoder.embed_dim),
                                                                  num_classes)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> ProbeClassifier:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encode(self.encoder, images, self.pool)  # [N, D]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.head[1].weight.dtype  # bf16 when DeepSpeed converted the head
        return self.head(self.features(images).to(dtype))  # [N, C]


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


__all__ = ["ProbeHead", "ProbeClassifier", "AttentiveProbeHead", "AttentiveProbeClassifier", "default_num_heads"]
