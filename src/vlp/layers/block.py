"""Transformer blocks: the one block every tower is built from (self-attention, optional cross-attention,
MLP; pre- or post-norm), and open_clip CoCa's cross-attention + MLP block."""

from __future__ import annotations

import torch
from torch import nn

from vlp.layers.attention import Attention
from vlp.layers.mlp import Activation, Mlp

KeyValue = tuple[torch.Tensor, torch.Tensor]


class TransformerBlock(nn.Module):
    """Self-attention, then (with `context_dim`) cross-attention to a context, then an MLP; each a residual
    branch whose LayerNorm comes before it (pre-norm: ViT, CLIP) or after the residual sum (`post_norm`:
    BERT, BLIP's MED, the Q-Former).

    `causal_self_attention` gives causal passes a self-attention of their own (BLIP's decoder shares
    everything with its encoder but that)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        norm_eps: float = 1e-5,
        context_dim: int | None = None,
        post_norm: bool = False,
        causal_self_attention: bool = False,
    ):
        super().__init__()
        self.post_norm = post_norm
        # Created in this order so that seeded initialisation draws the same numbers for every layout.
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.decoder_norm1: nn.LayerNorm | None = None
        self.decoder_attn: Attention | None = None
        if causal_self_attention:
            self.decoder_norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.decoder_attn = Attention(dim, num_heads)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: Attention | None = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, branch) -> torch.Tensor:
        """x + branch(x), normalised after (post-norm) or the branch's input normalised (pre-norm)."""
        return norm(x + branch(x)) if self.post_norm else x + branch(norm(x))

    def _self_attention(self, causal: bool) -> tuple[Attention, nn.LayerNorm]:
        if causal and self.decoder_attn is not None:
            return self.decoder_attn, self.decoder_norm1
        return self.attn, self.norm1

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        decoder: bool = False,
        text_only: bool = False,
    ) -> torch.Tensor:
        """x [B, N, D]; context [B, M, Dc] to cross-attend to; `decoder` picks the causal passes' own
        self-attention when the block has one (`attn_mask` then carries the causal mask); `text_only` runs
        the block without its cross-attention (BLIP's unimodal text encoder, on the same layers)."""
        attn, norm = self._self_attention(decoder)
        x = self._residual(x, norm, lambda h: attn(h, attn_mask=attn_mask, is_causal=is_causal))
        if self.cross_attn is not None and not text_only:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, context, attn_mask=context_mask))
        return self._residual(x, self.norm2, self.mlp)

    def decode(
        self,
        x: torch.Tensor,
        past: KeyValue | None,
        attn_mask: torch.Tensor,
        *,
        context_kv: KeyValue | None = None,
        context_mask: torch.Tensor | None = None,
        decoder: bool = True,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Incremental decoding of the newest positions x [B, t, D]: returns them and the extended key/value
        cache; `context_kv` (the cross-attention's keys and values of the context) when it cross-attends."""
        if self.cross_attn is not None and context_kv is None:
            raise ValueError("this block cross-attends: decode it with the context's keys and values")
        attn, norm = self._self_attention(decoder)
        present: KeyValue | None = None

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            nonlocal present
            out, present = attn.cached(h, past, attn_mask=attn_mask)
            return out

        x = self._residual(x, norm, self_attention)
        if context_kv is not None:
            cross = self.cross_attn
            x = self._residual(x, self.norm_cross, lambda h: cross.cached(h, None, attn_mask=context_mask,
                                                                          context_kv=context_kv)[0])
        return self._residual(x, self.norm2, self.mlp), present


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
