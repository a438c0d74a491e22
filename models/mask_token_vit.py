"""The BEiT/SimMIM-style masked encoder: a plain timm ViT that sees every patch, masked ones replaced by a token.

`MaskTokenViT` is the base of the SimMIM model and the data2vec student. `.encoder` is a timm `VisionTransformer`
(its keys are `encoder.<timm name>`, so `models.convert.to_encoder_state_dict` exports it as it does MAE's), and
`.mask_token` [1, 1, D] is learned. `encode(imgs, mask)` replaces the patch embeddings of the masked positions by the
mask token BEFORE the position embedding is added (SimMIM), then runs timm's own path: `_pos_embed` (CLS token +
position embedding), `patch_drop`, `norm_pre`, the blocks and the final norm. Visible positions therefore get exactly
`patch_embed + pos_embed`, and with no mask `encode` equals `encoder.forward_features`.

Masks come from noise as MAE's do (`models/masking.py`): `make_noise` draws random or BEiT block noise, and the
`L - int(L * (1 - ratio))` patches with the largest noise are masked. The interface mirrors `MaskedAutoencoder`
(`make_noise`, `patchify`, `unpatchify`, `patch_size`, `grid_size`, `mask_ratio`, `mask_type`, `encoder_cfg`), so
masks, pictures and exports treat both alike. The position embedding is the fixed sin-cos one and the init is MAE's
(`models/init_weights.py`), so objectives differ only in what they learn.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import checkpoint_seq

from .init_weights import init_linear_and_norm, init_vit_encoder
from .masking import block_mask_noise, mask_from_noise, num_kept
from .patch_targets import patchify, unpatchify
from .vit import create_encoder

MASK_TYPES = ("random", "block")


class MaskTokenViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, mask_ratio=0.6, mask_type="block", mask_min_block=16, mask_max_block=None):
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        num_kept(1, mask_ratio)  # validates the ratio
        self.encoder_cfg = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.patch_size, self.in_chans = patch_size, in_chans
        self.mask_ratio, self.mask_type = mask_ratio, mask_type
        self.mask_min_block, self.mask_max_block = mask_min_block, mask_max_block
        self.grad_checkpointing = False
        self.encoder = create_encoder(**self.encoder_cfg, weight_init="skip")
        self.grid_size = tuple(self.encoder.patch_embed.grid_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's init for the encoder and every Linear/LayerNorm; the mask token N(0, 0.02). Subclasses call it last."""
        init_vit_encoder(self.encoder)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    # ---- masks --------------------------------------------------------------------------------------------
    def make_noise(self, n: int, device=None, generator: torch.Generator | None = None, mask_ratio=None):
        """Masking noise [N, L] for this model's mask type (pass it as `noise=` for seeded masks)."""
        gh, gw = self.grid_size
        if self.mask_type == "block":
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            return block_mask_noise(n, gh, gw, ratio, generator=generator, device=device,
                                    min_block=self.mask_min_block, max_block=self.mask_max_block)
        gen_device = generator.device if generator is not None else device
        return torch.rand(n, gh * gw, generator=generator, device=gen_device).to(device)

    def make_mask(self, imgs: torch.Tensor, mask_ratio=None, noise=None) -> torch.Tensor:
        """[N, L] float32 mask (1 = masked) from `noise`, or from fresh noise of the model's mask type."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None:
            noise = self.make_noise(imgs.shape[0], device=imgs.device, mask_ratio=ratio)
        elif noise.shape != (imgs.shape[0], self.num_patches):
            raise ValueError(f"noise must have shape {(imgs.shape[0], self.num_patches)}, got {tuple(noise.shape)}")
        return mask_from_noise(noise.to(imgs.device), ratio)

    # ---- encoder ------------------------------------------------------------------------------------------
    def embed(self, imgs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens [N, 1+L, D] entering the first block: masked patch embeddings -> mask token, then CLS + pos."""
        if imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} image channels, got input of shape {tuple(imgs.shape)}")
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D]
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)  # [N, L, 1]
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = enc._pos_embed(x)  # timm: prepend CLS, add the position embedding
        x = enc.patch_drop(x)
        return enc.norm_pre(x)

    def encode(self, imgs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Final-normed tokens [N, 1+L, D] (CLS first) of the whole, partly masked, image."""
        x = self.embed(imgs, mask)
        blocks = self.encoder.blocks
        x = checkpoint_seq(blocks, x) if self.grad_checkpointing and self.training else blocks(x)
        return self.encoder.norm(x)

    # ---- pixels <-> patches -------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid_size=None) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid_size or self.grid_size)


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `per_patch` [N, L] over the masked positions (float32; no host read, 0 when nothing is masked)."""
    mask = mask.float()
    return (per_patch.float() * mask).sum() / mask.sum().clamp(min=1.0)


__all__ = ["MaskTokenViT", "masked_mean", "MASK_TYPES"]
