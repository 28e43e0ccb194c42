"""Patch and position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: [B, 3, H, W] -> [B, (H/p)(W/p), D].

    With `stem_channels`, ViTC's convolutional stem instead (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): one 3x3 convolution of stride 2 per width listed, each with BatchNorm and
    ReLU, then a 1x1 convolution to the width (p must be 2 ** len(stem_channels)). Small overlapping kernels
    give the tokens the locality a single patch projection lacks, which a small ViT trained from scratch
    needs."""

    def __init__(self, patch_size: int, dim: int, *, in_channels: int = 3, bias: bool = False,
                 stem_channels: list[int] | None = None):
        super().__init__()
        self.patch_size = patch_size
        if not stem_channels:
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)
            return
        layers: list[nn.Module] = []
        for width in stem_channels:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            in_channels = width
        layers.append(nn.Conv2d(in_channels, dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int, *, mode: str = "bicubic"
) -> torch.Tensor:
    """Resize a learned [N_prefix + g*g, D] position table to a new patch grid, bicubically, or linearly
    with the corners kept (`mode="bilinear"`: scipy's `zoom(order=1)`, how OWL-ViT enlarges CLIP's table).

    Prefix rows (the class token) are kept as they are; the patch rows are treated as a square image.
    """
    prefix, patches = pos_embed[:num_prefix], pos_embed[num_prefix:]
    old = math.isqrt(patches.shape[0])
    if old * old != patches.shape[0]:
        raise ValueError(f"position table of {patches.shape[0]} patch rows is not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    dim = patches.shape[-1]
    image = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    if mode == "bilinear":
        image = F.interpolate(image, size=grid, mode="bilinear", align_corners=True)
    else:
        image = F.interpolate(image, size=grid, mode="bicubic", align_corners=False, antialias=True)
    patches = image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=0)
