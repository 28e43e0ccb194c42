"""Token pooling: multi-head attention pooling (MAP) with learned queries."""

from __future__ import annotations

import torch
from torch import nn

from vlp.layers.attention import Attention
from vlp.layers.mlp import Activation, Mlp


class AttentionPool(nn.Module):
    """Learned queries attend to the tokens, then a residual MLP (big_vision's MAP head).

    Returns [B, num_queries, D]; SigLIP takes query 0 as the image embedding.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_queries: int = 1,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.attn = Attention(dim, num_heads, context_dim=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(tokens.shape[0], -1, -1)
        x = self.attn(probe, tokens, attn_mask=mask)
        return x + self.mlp(self.norm(x))
