"""Multi-head attention through `scaled_dot_product_attention`, for self- and cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """[B, Lk] (1 = real token) -> boolean attention mask [B, 1, 1, Lk] (True = may attend)."""
    return key_mask.bool()[:, None, None, :]


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Boolean [L, L] lower-triangular mask (True = may attend)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def incremental_causal_mask(key_mask: torch.Tensor, new: int) -> torch.Tensor:
    """The mask of `new` positions decoded after cached ones: key_mask [B, past + new] (1 = real token)
    -> [B, 1, new, past + new], new row i (position past + i) seeing real keys up to itself."""
    length = key_mask.shape[1]
    positions = torch.arange(length - new, length, device=key_mask.device)
    causal = torch.arange(length, device=key_mask.device)[None, :] <= positions[:, None]  # [new, past + new]
    return padding_mask(key_mask) & causal


class Attention(nn.Module):
    """Self-attention with one fused q/k/v projection, or cross-attention to a context of `context_dim`.

    Fusing q/k/v into one matmul is faster and matches the packed `in_proj_weight` layout of
    open_clip and OpenAI CLIP; converters split it for Hugging Face checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q_proj = nn.Linear(dim, dim, bias=bias)
            self.kv_proj = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)  # [B, H, N, Dh]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: [B, N, D]; context: [B, M, Dc] for cross-attention; attn_mask: bool, True = may attend."""
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q, (k, v) = self._heads(self.q_proj(x)), self.context_kv(context)
        else:
            q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
        if is_causal and attn_mask is not None:
            attn_mask = attn_mask & causal_mask(q.shape[2], q.device)
            is_causal = False
        return self._attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        rows, samples, length = q.shape[0], k.shape[0], q.shape[2]
        if rows != samples:
            # Keys and values shared by each sample's consecutive rows (beam search's beams over one image's
            # cross-attention keys and values): one attention per sample, its rows' queries side by side,
            # so the keys and values are neither copied per row nor read once per row.
            if rows % samples or is_causal:
                raise ValueError(f"{rows} query rows cannot share the keys and values of {samples} samples")
            q = q.unflatten(0, (samples, -1)).transpose(1, 2).flatten(2, 3)  # [S, H, rows/S * t, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        if rows != samples:
            out = out.unflatten(2, (-1, length)).transpose(1, 2).flatten(0, 1)  # [rows, H, t, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(rows, length, -1))

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values [B, H, M, Dh] of a context, computed once for a whole generation."""
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def cached(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        attn_mask: torch.Tensor | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Incremental decoding. Self-attention: x [B, t, D] are the newest positions; their keys and values
        are appended to `past` and returned as the new cache. Cross-attention: attend to `context_kv`, which
        may hold one sample's keys and values for several consecutive rows of x ([S, H, M, Dh], B a multiple
        of S). attn_mask is over the keys ([B or 1, 1, t, past + t]; [S, 1, 1, M] for shared ones)."""
        if self.is_cross:
            return self._attend(self._heads(self.q_proj(x)), *context_kv, attn_mask=attn_mask), None
        q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        return self._attend(q, k, v, attn_mask=attn_mask), (k, v)
