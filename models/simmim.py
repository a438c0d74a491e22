"""SimMIM (Xie et al. 2022), the BEiT-style objective without a tokenizer: the ViT sees every patch, masked ones as a
learned mask token; a linear head predicts each patch's target; L1 loss on the masked patches only.

`SimMIM(**encoder_cfg, mask_ratio, mask_type, target="pixels"|"hog", norm_pix_loss, hog_cell, hog_bins, ...)`:
`.encoder` is a plain timm ViT, `.mask_token`, `.head` (Linear D -> target dim, applied to every patch token).
`forward(imgs, mask_ratio=None, noise=None) -> (loss, pred [N, L, dim], mask [N, L])`, as `MaskedAutoencoder`'s,
so the reconstruction grid can draw pixel predictions. Defaults follow SimMIM/BEiT: block masks, ratio 0.6.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .mask_token_vit import MaskTokenViT, masked_mean
from .patch_targets import PatchTargets


class SimMIM(MaskTokenViT):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, mask_ratio=0.6, mask_type="block", target="pixels", norm_pix_loss=False,
                 hog_cell=None, hog_bins=9, mask_min_block=16, mask_max_block=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                         mask_type=mask_type, mask_min_block=mask_min_block, mask_max_block=mask_max_block)
        self.target, self.norm_pix_loss = target, norm_pix_loss
        self.targets = PatchTargets(target, patch_size, in_chans, norm_pix=norm_pix_loss, hog_cell=hog_cell,
                                    hog_bins=hog_bins, img_size=img_size)
        self.head = nn.Linear(embed_dim, self.targets.dim)  # SimMIM's "light" one-layer prediction head
        self.initialize_weights()

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over the masked patches only (float32), each patch's error averaged over its vector."""
        per_patch = (pred.float() - self.targets(imgs)).abs().mean(dim=-1)  # [N, L]
        return masked_mean(per_patch, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio=None, noise=None):
        """-> (loss, pred [N, L, dim] at every patch, mask [N, L] float32, 1 = masked)."""
        mask = self.make_mask(imgs, mask_ratio, noise)
        tokens = self.encode(imgs, mask)[:, self.encoder.num_prefix_tokens:]  # [N, L, D]
        pred = self.head(tokens)
        return self.forward_loss(imgs, pred, mask), pred, mask


__all__ = ["SimMIM"]
