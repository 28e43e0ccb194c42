"""A compact convolutional image tower (ALIGN-style: a CNN image encoder beside a transformer text encoder).

Small vision transformers trained from scratch learn shape slowly: on the shapes world a 4-layer ViT
stays near chance on shape for hundreds of steps while this tower learns it in about 200. The tiny
demo configs use it; the ViT remains the tower for real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlp.config import PositiveInt
from vlp.layers import Activation, AttentionPool, make_activation


@dataclass
class ConvNetConfig:
    kind: Literal["convnet"] = "convnet"
    image_size: PositiveInt = 64
    # One stage per entry: a 3x3 convolution and the activation, then 2x max-pooling between stages.
    channels: tuple[PositiveInt, ...] = (32, 64, 128, 256)
    act: Activation = "gelu"
    # max: global max over positions, so a small object anywhere in the image drives the embedding.
    pool: Literal["max", "mean", "map"] = "max"
    heads: PositiveInt = 4  # for map pooling

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("channels must name at least one stage")
        if self.pool == "map" and self.width % self.heads:
            raise ValueError(f"last stage width {self.width} is not divisible by {self.heads} heads")

    @property
    def width(self) -> int:
        return self.channels[-1]


class ConvNet(nn.Module):
    def __init__(self, cfg: ConvNetConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_channels = 3
        for index, channels in enumerate(cfg.channels):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), make_activation(cfg.act)]
            in_channels = channels
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.width)
        self.pool = AttentionPool(cfg.width, cfg.heads, act=cfg.act) if cfg.pool == "map" else None

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> normalised position tokens [B, h*w, C]."""
        return self.norm(self.stages(images).flatten(2).transpose(1, 2))

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "max":
            return tokens.amax(dim=1)
        if self.cfg.pool == "mean":
            return tokens.mean(dim=1)
        return self.pool(tokens)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, C], tokens [B, N, C])."""
        tokens = self.forward_features(images)
        return self.pool_tokens(tokens), tokens
