"""The MAE initialisation, shared by every pretraining objective so that comparisons differ only in the objective.

`init_linear_and_norm(module)` (for `Module.apply`): xavier-uniform Linear weights, zero biases, LayerNorm 1/0.
`init_vit_encoder(encoder)`: fixed 2-D sin-cos position embedding (frozen), the patch projection xavier-uniform as
a 2-D matrix, the CLS token N(0, 0.02); the blocks are left to `init_linear_and_norm`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .pos_embed import sincos_2d


def init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@torch.no_grad()
def init_vit_encoder(encoder) -> None:
    """Sin-cos position embedding (requires_grad off), xavier patch projection, CLS token N(0, 0.02)."""
    gh, gw = encoder.patch_embed.grid_size
    encoder.pos_embed.requires_grad_(False)
    encoder.pos_embed.copy_(sincos_2d(encoder.embed_dim, gh, gw).unsqueeze(0))
    proj = encoder.patch_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.normal_(encoder.cls_token, std=0.02)


__all__ = ["init_linear_and_norm", "init_vit_encoder"]
