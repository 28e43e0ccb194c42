"""The text transformer shared by every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.layers import Activation, TransformerBlock, padding_mask


@dataclass
class TextConfig:
    vocab_size: PositiveInt = 49408
    context_length: PositiveInt = 77
    width: PositiveInt = 512
    layers: PositiveInt = 12
    heads: PositiveInt = 8
    mlp_ratio: PositiveFloat = 4.0
    act: Activation = "gelu"
    norm_eps: PositiveFloat = 1e-5
    causal: bool = True
    # Bidirectional towers attend only to real tokens; a causal tower pooled at the end-of-text token
    # never sees the padding after it, so it can skip the mask and use the fused causal kernel.
    mask_padding: bool = False
    # eot: the end-of-text token (the first `eot_token_id`, else the last real token by the mask);
    # argmax: the largest id, open_clip's default, where end-of-text is the highest id in the vocabulary.
    pool: Literal["eot", "argmax", "last", "first"] = "eot"
    eot_token_id: int | None = None
    cross_attention_width: int | None = None  # set to the image width for image-grounded text
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps,
                context_dim=cfg.cross_attention_width,
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward_features(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text: [B, L] ids; text_mask: [B, L] (1 = real token). Returns normalised tokens [B, L, D]."""
        length = text.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"text of {length} tokens exceeds context_length {self.cfg.context_length}")
        x = self.token_embedding(text) + self.pos_embed[:length].to(self.token_embedding.weight.dtype)
        mask = padding_mask(text_mask) if self.cfg.mask_padding and text_mask is not None else None
        context_mask = padding_mask(image_mask) if image_mask is not None else None
        for block in self.blocks:
            kwargs = {"attn_mask": mask, "is_causal": self.cfg.causal, "context": image_tokens,
                      "context_mask": context_mask}
            if self.cfg.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return self.ln_final(x)

    def pool_positions(self, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The index of each text's pooled token: end-of-text, largest id or first; None for the last."""
        if self.cfg.pool == "first":
            return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
        if self.cfg.pool == "argmax":
            return text.argmax(dim=-1)
        if self.cfg.pool == "eot" and self.cfg.eot_token_id is not None:
            return (text == self.cfg.eot_token_id).int().argmax(dim=-1)
        if self.cfg.pool == "eot" and text_mask is not None:
            # The tokenizer ends every text with its end-of-text token, so it sits at the last real position.
            return text_mask.long().sum(dim=1).clamp(min=1) - 1
        return None

    def pool_tokens(
        self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Tokens [B, L, D] -> pooled [B, D] at the end-of-text, largest-id, last or first token."""
        positions = self.pool_positions(text, text_mask)
        if positions is None:
            return tokens[:, -1]
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), positions]

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features [B, D] only. A causal tower stops at the batch's last pooled position: no token
        before it attends to the padding after it, so the result is exact, and short captions padded to
        the context length cost their own length rather than the whole context."""
        positions = self.pool_positions(text, text_mask)
        if self.cfg.causal and positions is not None:
            length = int(positions.max()) + 1
            text = text[:, :length]
            text_mask = text_mask[:, :length] if text_mask is not None else None
        return self.pool_tokens(self.forward_features(text, text_mask), text, text_mask)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, **cross: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, D], tokens [B, L, D])."""
        tokens = self.forward_features(text, text_mask, **cross)
        return self.pool_tokens(tokens, text, text_mask), tokens
