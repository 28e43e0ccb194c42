"""The pre-norm transformer block: self-attention, optional cross-attention, MLP."""

from __future__ import annotations

import torch
from torch import nn

from vlp.layers.attention import Attention
from vlp.layers.mlp import Activation, Mlp


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        norm_eps: float = 1e-5,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, attn_mask=context_mask)
        return x + self.mlp(self.norm2(x))
