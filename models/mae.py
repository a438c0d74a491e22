"""Masked autoencoder (He et al. 2021) around a timm ViT encoder, with a light timm-Block decoder.

`MaskedAutoencoder.encoder` is a plain timm VisionTransformer (keys `encoder.*` are timm's); the decoder parameters
keep the official names (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`,
`decoder_pred`), so official checkpoints map onto ours by adding the `encoder.` prefix. Attention is timm's
`Attention`, which uses `F.scaled_dot_product_attention` (fused kernels) by default.
`target="hog"` regresses MaskFeat HOG histograms instead of pixels (`models/patch_targets.py`); `decoder_pred` then
has the HOG vector's width.
"""

from functools import partial

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import LayerNorm
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block

from .init_weights import init_linear_and_norm
from .masking import block_mask_noise, num_kept, random_masking
from .patch_targets import PatchTargets
from .pos_embed import sincos_2d
from .vit import create_encoder

MASK_TYPES = ("random", "block")


class MaskedAutoencoder(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        decoder_mlp_ratio=None,
        norm_pix_loss=False,
        mask_ratio=0.75,
        mask_type="random",
        target="pixels",
        hog_cell=None,
        hog_bins=9,
        mask_min_block=16,
        mask_max_block=None,
    ):
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        num_kept(1, mask_ratio)  # validates the ratio
        self.encoder_cfg = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        decoder_mlp_ratio = mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio
        self.decoder_cfg = dict(embed_dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                                mlp_ratio=decoder_mlp_ratio)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.mask_min_block, self.mask_max_block = mask_min_block, mask_max_block
        self.target = target
        self.targets = PatchTargets(target, patch_size, in_chans, norm_pix=norm_pix_loss,
                                    hog_cell=hog_cell, hog_bins=hog_bins, img_size=img_size)
        self.grad_checkpointing = False

        # weight_init="skip": timm's own init is replaced by the MAE init below.
        self.encoder = create_encoder(**self.encoder_cfg, weight_init="skip")
        self.grid_size = tuple(self.encoder.patch_embed.grid_size)  # (H/p, W/p)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, filled in initialize_weights

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True,
                  norm_layer=partial(LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)
        ))
        self.decoder_norm = LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.targets.dim)  # p*p*C for pixel targets
        self.initialize_weights()

    # ---- init -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self):
        """Official MAE init: fixed sin-cos pos-embeds, xavier Linear (patch proj as 2-D), LN 1/0, tokens N(0, .02)."""
        gh, gw = self.grid_size
        self.encoder.pos_embed.copy_(sincos_2d(self.encoder.embed_dim, gh, gw).unsqueeze(0))
        self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], gh, gw).unsqueeze(0))
        proj = self.encoder.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing for encoder and decoder blocks (timm's checkpoint_seq)."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    # ---- pixels <-> patches -----------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], per-patch vector ordered (p, q, c) as the official code."""
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor, grid_size=None) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W] (inverse of patchify; grid defaults to the model's)."""
        gh, gw = grid_size or self.grid_size
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=gh, w=gw, p=p, q=p)

    # ---- masking ----------------------------------------------------------------------------------------------
    def make_noise(self, n: int, device=None, generator: torch.Generator | None = None, mask_ratio=None):
        """Masking noise [N, L] for this model's mask type; pass it to forward(noise=...) for seeded masks."""
        gh, gw = self.grid_size
        if self.mask_type == "block":
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            return block_mask_noise(n, gh, gw, ratio, generator=generator, device=device,
                                    min_block=self.mask_min_block, max_block=self.mask_max_block)
        gen_device = generator.device if generator is not None else device
        return torch.rand(n, gh * gw, generator=generator, device=gen_device).to(device)

    # ---- the three verbs --------------------------------------------------------------------------------------
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """-> latent [N, 1+K, D] (CLS first), mask [N, L] (1 = removed), ids_restore [N, L]."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D]
        x = x + enc.pos_embed[:, 1:, :]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        x = enc.norm_pre(x)
        x = checkpoint_seq(enc.blocks, x) if self.grad_checkpointing and self.training else enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """latent [N, 1+K, D] -> pred [N, L, p*p*C] for every patch (CLS dropped)."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length, dim = x.shape[0], ids_restore.shape[1], x.shape[2]
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L-K, Dd]
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # [N, L, Dd] unshuffled
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        if self.grad_checkpointing and self.training:
            x = checkpoint_seq(self.decoder_blocks, x)
        else:
            x = self.decoder_blocks(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1+L, p*p*C]
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error over removed patches only (optionally against per-patch normalised pixels).

        Computed in float32 whatever the model dtype (bf16 norm-pix statistics and sums lose precision).
        """
        if self.target != "pixels":  # HOG histograms [N, L, dim]
            loss = ((pred.float() - self.targets(imgs)) ** 2).mean(dim=-1)
            return (loss * mask.float()).sum() / mask.float().sum()
        target = self.patchify(imgs).float()  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L] per-patch MSE
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=None, noise=None):
        """-> (loss, pred [N, L, p*p*C], mask [N, L])."""
        if imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} image channels, got input of shape {tuple(imgs.shape)}")
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None and self.mask_type == "block":
            noise = self.make_noise(imgs.shape[0], device=imgs.device, mask_ratio=mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

