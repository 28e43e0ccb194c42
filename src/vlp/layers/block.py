"""Pre-norm transformer blocks: self-attention (optional cross-attention) + MLP, and cross-attention + MLP."""

from __future__ import annotations

import torch
from torch import nn

from vlp.layers.attention import Attention
from vlp.layers.mlp import Activation, Mlp

KeyValue = tuple[torch.Tensor, torch.Tensor]


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

    def decode(self, x: torch.Tensor, past: KeyValue | None, attn_mask: torch.Tensor) -> tuple[torch.Tensor, KeyValue]:
        """Incremental decoding of the newest positions x [B, t, D] of a self-attention block: returns them
        and the extended key/value cache."""
        if self.cross_attn is not None:
            raise ValueError("decode runs self-attention blocks; pair them with CrossAttentionBlocks for a context")
        out, present = self.attn.cached(self.norm1(x), past, attn_mask=attn_mask)
        x = x + out
        return x + self.mlp(self.norm2(x)), present


class CrossAttentionBlock(nn.Module):
    """Queries from x attend to a normalised context, then an MLP of its own: the multimodal half of
    open_clip's CoCa decoder pairs one of these with each causal self-attention block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)

    def context_kv(self, context: torch.Tensor) -> KeyValue:
        """Keys and values [B, H, M, Dh] of a context [B, M, Dc]; computed once per image in generation."""
        return self.attn.context_kv(self.norm_context(context))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, context_kv: KeyValue | None = None
    ) -> torch.Tensor:
        """x [B, N, D] attends to context [B, M, Dc], or to its keys and values from `context_kv`."""
        if context_kv is None:
            context_kv = self.context_kv(context)
        x = x + self.attn.cached(self.norm1(x), None, context_kv=context_kv)[0]
        return x + self.mlp(self.norm2(x))
