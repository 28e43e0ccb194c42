"""The vision transformer shared by every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.layers import Activation, AttentionPool, PatchEmbed, TransformerBlock, resize_pos_embed


@dataclass
class VisionConfig:
    kind: Literal["vit"] = "vit"
    image_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    width: PositiveInt = 768
    layers: PositiveInt = 12
    heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    act: Activation = "gelu"
    norm_eps: PositiveFloat = 1e-5
    class_token: bool = True
    patch_bias: bool = False  # CLIP's patch conv has no bias, SigLIP's has one
    # A convolutional stem (ViTC) instead of the patch projection: one stride-2 3x3 convolution per width
    # listed, 2 ** len(stem_channels) == patch_size. Small ViTs trained from scratch learn shape with it.
    stem_channels: list[PositiveInt] | None = None
    ln_pre: bool = True  # CLIP normalises tokens before the blocks, SigLIP does not
    ln_post: bool = True  # open_clip's CoCa normalises after its attentional pooler instead
    pool: Literal["cls", "mean", "map"] = "cls"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(f"a stem of {len(self.stem_channels)} stride-2 convolutions makes patches of "
                             f"{2 ** len(self.stem_channels)}, not patch_size {self.patch_size}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool 'cls' needs class_token: true")


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.num_prefix = 1 if cfg.class_token else 0
        self.patch_embed = PatchEmbed(cfg.patch_size, width, bias=cfg.patch_bias, stem_channels=cfg.stem_channels)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(self.num_prefix + self.grid**2, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps)
            for _ in range(cfg.layers)
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.ln_post else nn.Identity()
        self.pool = (
            AttentionPool(width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps)
            if cfg.pool == "map" else None
        )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> final-normalised tokens [B, prefix + patches, D]."""
        x = self.patch_embed(images)  # [B, N, D]
        grid = (images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size)
        pos = resize_pos_embed(self.pos_embed, grid, self.num_prefix)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = self.ln_pre(x + pos.to(x.dtype))
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_post(x)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens [B, N, D] -> pooled [B, D]."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return tokens[:, self.num_prefix:].mean(dim=1)
        return self.pool(tokens)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, D], tokens [B, N, D])."""
        tokens = self.forward_features(images)
        return self.pool_tokens(tokens), tokens
