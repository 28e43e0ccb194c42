"""Token pooling with learned queries: big_vision's MAP head and CoCa's attentional pooler."""

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


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: learned queries [Q, D] cross-attend to the tokens, both LayerNormed;
    no MLP. The context width may differ from the query width (open_clip's `AttentionalPooler`)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, num_queries: int, norm_eps: float = 1e-5):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.norm_query = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, context_dim=context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, Dc] -> [B, Q, D]."""
        query = self.norm_query(self.query).expand(tokens.shape[0], -1, -1)
        return self.attn(query, self.norm_context(tokens))
