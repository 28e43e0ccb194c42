"""CoCa: the contrastive captioner. One image encoder, one text decoder whose first half is unimodal
and whose second half cross-attends to the image; one forward pass gives both losses.

- Image: encoder tokens -> attentional pooling. The paper pools twice, 1 query for the contrastive
  embedding and 256 for the captioning tokens (`pooler: separate`); open_clip's CoCa pools once with
  256 queries and takes query 0 as the embedding, the other 255 as the tokens (`pooler: shared`).
- Unimodal text decoder: causal, with a learned CLS appended after the text at the last position; its
  state (LayerNormed, projected) is the text embedding. The text states before it, not normalised,
  feed the multimodal decoder.
- Multimodal decoder: per layer a causal self-attention block and a cross-attention block to the
  pooled image tokens, each with its own MLP (open_clip's layout), then LayerNorm and the vocabulary
  projection.

Generation keeps a key/value cache for both halves (open_clip recomputes the whole prefix each step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vlp.config import PositiveInt
from vlp.generation import StepDecoder
from vlp.layers import (
    AttentionalPooler,
    CrossAttentionBlock,
    KeyValue,
    TransformerBlock,
    incremental_causal_mask,
)
from vlp.models.clip import DualEncoderOutput
from vlp.towers import ImageTowerConfig, TextConfig, TextTransformer, VisionConfig, build_image_tower


@dataclass
class CocaConfig:
    # The contrastive embedding width, and the width of the pooled image tokens the decoder reads.
    embed_dim: PositiveInt = 512
    # coca_ViT-B-32's image encoder; its LayerNorm comes after the pooler (ln_post below).
    vision: ImageTowerConfig = field(
        default_factory=lambda: VisionConfig(
            image_size=224, patch_size=32, width=768, layers=12, heads=12, ln_post=False
        )
    )
    # The unimodal half: context_length text tokens, and one more position for the appended CLS.
    text: TextConfig = field(default_factory=lambda: TextConfig(context_length=76, width=512, layers=12, heads=8))
    multimodal_layers: PositiveInt = 12  # the multimodal half; width, MLP and activation are the text's
    multimodal_heads: PositiveInt | None = None  # None = text.heads
    pooler: Literal["separate", "shared"] = "separate"
    caption_queries: PositiveInt = 256  # the captioning pooler's queries (shared: 1 + the 255 tokens)
    pooler_heads: PositiveInt = 8
    # Which keys the CLS attends to: the real tokens and itself (correct), or open_clip's released
    # weights' off-by-one padding mask (legacy: the first padding position, not itself).
    cls_mask: Literal["correct", "legacy"] = "correct"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (SigLIP: -10) for the sigmoid contrastive loss
    # Tokens generation writes: it starts from bos and stops at eos (the trainer checks both against
    # the tokenizer); finished rows are padded.
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.text.causal:
            raise ValueError("CoCa's text decoder is causal: text.causal must be true")
        if self.text.cross_attention_width is not None:
            raise ValueError("text.cross_attention_width: CoCa's unimodal half has no cross-attention")
        if self.pooler == "shared" and self.caption_queries < 2:
            raise ValueError("pooler 'shared' needs caption_queries >= 2: query 0 is the contrastive embedding")
        if self.multimodal_heads and self.text.width % self.multimodal_heads:
            raise ValueError(f"text.width {self.text.width} is not divisible by multimodal_heads {self.multimodal_heads}")
        if self.embed_dim % self.pooler_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by pooler_heads {self.pooler_heads}")


class CocaTextEncoder(TextTransformer):
    """The unimodal half: the shared text tower with its CLS appended at position `context_length`
    whatever the text's length, LayerNorm on the CLS state only."""

    def __init__(self, cfg: TextConfig, cls_mask: Literal["correct", "legacy"]):
        super().__init__(cfg, cls_token=True)
        self.cls_mask = cls_mask

    def _keys_seen_by_cls(self, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, T + 1] keys (text, then CLS) the CLS attends to."""
        ones = text_mask.new_ones(text_mask.shape[0], 1)
        if self.cls_mask == "correct":
            return torch.cat([text_mask, ones], dim=1)
        return torch.cat([ones, text_mask], dim=1)  # shifted by one, as open_clip's released weights saw it

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text, text_mask [B, L] -> (CLS state after LayerNorm [B, D], text states [B, T, D]).

        The text is cut to the batch's longest (legacy mask: one position more, the CLS sees it):
        causal states do not depend on the padding after them, so the result is the same as at full
        length, at the cost of the real length."""
        length, limit = text.shape[1], self.cfg.context_length
        if length > limit:
            raise ValueError(f"text of {length} tokens exceeds context_length {limit}")
        keep = int(text_mask.sum(dim=1).max()) + (self.cls_mask == "legacy")
        keep = max(1, min(keep, length))
        text, text_mask = text[:, :keep], text_mask[:, :keep]
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(text) + self.pos_embed[:keep].to(dtype)
        cls = (self.cls_embedding + self.pos_embed[limit]).to(dtype).expand(len(text), 1, -1)
        x = torch.cat([x, cls], dim=1)  # [B, T + 1, D]
        # Text rows: causal. The CLS row (last): the keys its mask allows.
        mask = torch.ones(keep + 1, keep + 1, dtype=torch.bool, device=x.device).tril()
        mask = mask.expand(len(text), 1, -1, -1).clone()  # [B, 1, T + 1, T + 1]
        mask[:, 0, -1] = self._keys_seen_by_cls(text_mask).bool()
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, attn_mask=mask)
            else:
                x = block(x, attn_mask=mask)
        return self.ln_final(x[:, -1]), x[:, :-1]


class MultimodalDecoder(nn.Module):
    """The multimodal half: causal self-attention and cross-attention to the image tokens, layer by
    layer, then LayerNorm and the vocabulary projection (not tied to the token embedding)."""

    def __init__(self, cfg: CocaConfig):
        super().__init__()
        text, heads = cfg.text, cfg.multimodal_heads or cfg.text.heads
        common = {"mlp_ratio": text.mlp_ratio, "act": text.act, "norm_eps": text.norm_eps}
        self.self_blocks = nn.ModuleList(
            TransformerBlock(text.width, heads, **common) for _ in range(cfg.multimodal_layers)
        )
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(text.width, heads, context_dim=cfg.embed_dim, **common)
            for _ in range(cfg.multimodal_layers)
        )
        self.ln_final = nn.LayerNorm(text.width, eps=text.norm_eps)
        self.lm_head = nn.Linear(text.width, text.vocab_size, bias=False)
        self.grad_checkpointing = text.grad_checkpointing

    def context_kv(self, image_tokens: torch.Tensor) -> list[KeyValue]:
        return [block.context_kv(image_tokens) for block in self.cross_blocks]

    def forward(self, text_states: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text_states [B, T, D], image_tokens [B, Q, E] -> next-token logits [B, T, V]."""
        x = text_states
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks, strict=True):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(self_block, x, use_reentrant=False, is_causal=True)
                x = torch.utils.checkpoint.checkpoint(cross_block, x, image_tokens, use_reentrant=False)
            else:
                x = cross_block(self_block(x, is_causal=True), image_tokens)
        return self.lm_head(self.ln_final(x))

    def decode(
        self, x: torch.Tensor, key_mask: torch.Tensor, cache: list[KeyValue] | None, context_kv: list[KeyValue]
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Logits [B, t, V] of the newest text states x [B, t, D] given the cached earlier ones."""
        mask = incremental_causal_mask(key_mask, x.shape[1])
        present = []
        for index, (self_block, cross_block) in enumerate(zip(self.self_blocks, self.cross_blocks, strict=True)):
            x, kv = self_block.decode(x, None if cache is None else cache[index], mask)
            x = cross_block(x, context_kv=context_kv[index])
            present.append(kv)
        return self.lm_head(self.ln_final(x)), present


@dataclass
class CocaOutput(DualEncoderOutput):
    caption_logits: torch.Tensor  # [B, T, V]: position i predicts text token i + 1


class Coca(nn.Module):
    def __init__(self, cfg: CocaConfig):
        super().__init__()
        self.cfg = cfg
        width, embed = cfg.vision.width, cfg.embed_dim
        self.visual = build_image_tower(cfg.vision)
        self.pooler = AttentionalPooler(embed, width, cfg.pooler_heads, num_queries=cfg.caption_queries)
        self.contrastive_pooler = (
            AttentionalPooler(embed, width, cfg.pooler_heads, num_queries=1) if cfg.pooler == "separate" else None
        )
        self.ln_post = nn.LayerNorm(embed)
        self.image_projection = nn.Linear(embed, embed, bias=False)
        self.text = CocaTextEncoder(cfg.text, cfg.cls_mask)
        self.text_projection = nn.Linear(cfg.text.width, embed, bias=False)
        self.decoder = MultimodalDecoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias)) if cfg.init_logit_bias is not None else None
        for proj, fan_in in ((self.image_projection, embed), (self.text_projection, cfg.text.width)):
            nn.init.normal_(proj.weight, std=fan_in**-0.5)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (contrastive embedding [B, E], L2-normalised; captioning tokens [B, Q, E])."""
        tokens = self.visual.forward_features(images)
        pooled = self.ln_post(self.pooler(tokens))
        if self.contrastive_pooler is None:
            embedding, pooled = pooled[:, 0], pooled[:, 1:]
        else:
            embedding = self.ln_post(self.contrastive_pooler(tokens))[:, 0]
        return F.normalize(self.image_projection(embedding), dim=-1), pooled

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image_tokens(images)[0]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output tokens [B, N, D] before the poolers."""
        return self.visual.forward_features(images)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(text, text_mask)[0]), dim=-1)

    def caption_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits [B, T, V] (T: the batch's text cut to its longest)."""
        return self.decoder(self.text(text, text_mask)[1], image_tokens)

    def caption_decoder(self, image_tokens: torch.Tensor) -> StepDecoder:
        """Both halves stepwise with key/value caches, for `vlp.generation`: each new token runs one position
        of the unimodal and the multimodal blocks; the image tokens' keys and values are computed once."""

        def step(ids: torch.Tensor, key_mask: torch.Tensor, cache: tuple | None, context_kv: list) -> tuple:
            text_cache, decoder_cache = cache or (None, None)
            states, text_cache = self.text.decode(ids, key_mask, text_cache)
            logits, decoder_cache = self.decoder.decode(states, key_mask, decoder_cache, context_kv)
            return logits[:, -1], (text_cache, decoder_cache)

        cfg = self.cfg
        return StepDecoder(step, state=self.decoder.context_kv(image_tokens), shared_state=True,
                           start_ids=[cfg.bos_token_id], eos_token_id=cfg.eos_token_id,
                           pad_token_id=cfg.pad_token_id, max_length=cfg.text.context_length)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> CocaOutput:
        image_features, image_tokens = self.encode_image_tokens(image)
        pooled, text_states = self.text(text, text_mask)
        return CocaOutput(
            image_features=image_features,
            text_features=F.normalize(self.text_projection(pooled), dim=-1),
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            caption_logits=self.decoder(text_states, image_tokens),
        )
