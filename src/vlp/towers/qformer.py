"""BLIP-2's Q-Former: a BERT-style tower whose first rows are learned queries.

Queries and text share each layer's self-attention; only the queries cross-attend to the frozen image
tokens (every `cross_attention_freq`-th layer, from layer 0), and queries and text have feed-forward
weights of their own. Text positions start at 0 after the queries, which take no position. What may see
what is one boolean mask per objective (`attention_mask`): ITC's unimodal passes, ITG's multimodal causal
mask, ITM's bidirectional mask (spec `blip2-family.md` §3.3–3.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.layers import Activation, Attention, KeyValue, Mlp, incremental_causal_mask

MaskKind = Literal["itc", "itg", "itm"]


@dataclass
class QFormerConfig:
    vocab_size: PositiveInt = 30523  # bert-base-uncased + [DEC]
    context_length: PositiveInt = 512
    width: PositiveInt = 768
    layers: PositiveInt = 12
    heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    act: Activation = "gelu"
    norm_eps: PositiveFloat = 1e-12
    num_queries: PositiveInt = 32
    cross_attention_freq: PositiveInt = 2
    # The text side (word and position embeddings, the text feed-forward weights): stage 1 and InstructBLIP
    # read text; BLIP-2's stage 2 keeps only the query path.
    text_input: bool = True
    pad_token_id: int = 0
    cls_token_id: int = 101
    eos_token_id: int = 102  # [SEP]
    dec_token_id: int = 30522

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")

    def special_tokens(self) -> dict[str, tuple[str, int]]:
        """config key -> (token, id) the tokenizer must agree on."""
        if not self.text_input:
            return {}
        return {
            "pad_token_id": ("[PAD]", self.pad_token_id),
            "cls_token_id": ("[CLS]", self.cls_token_id),
            "eos_token_id": ("[SEP]", self.eos_token_id),
            "dec_token_id": ("[DEC]", self.dec_token_id),
        }

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


def attention_mask(kind: MaskKind, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The paper's self-attention mask over [queries; text] (True = may attend), [B, 1, Q + L, Q + L].

    itc: queries see queries, text sees text (the unimodal mask: ITC runs it as two passes);
    itg: queries see queries, text sees the queries and the real text up to itself;
    itm: every row sees the queries and the real text."""
    batch, length = text_mask.shape
    total = num_queries + length
    device = text_mask.device
    real = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    is_query = torch.arange(total, device=device) < num_queries
    if kind == "itm":
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    elif kind == "itc":
        allowed = is_query[:, None] == is_query[None, :]
    elif kind == "itg":
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        allowed = is_query[None, :] | (~is_query[:, None] & causal)
    else:
        raise ValueError(f"unknown Q-Former mask '{kind}'; expected itc, itg or itm")
    return allowed[None, None] & real[:, None, None, :]


class QFormerLayer(nn.Module):
    """Post-norm self-attention over all rows, cross-attention for the query rows (when the layer has it),
    then the query rows through the query feed-forward and the text rows through the text one."""

    def __init__(self, cfg: QFormerConfig, context_width: int, cross_attention: bool):
        super().__init__()
        hidden = round(cfg.width * cfg.mlp_ratio)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg.width, cfg.heads, context_dim=context_width) if cross_attention else None
        self.norm_cross = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cross_attention else None
        self.mlp_query = Mlp(cfg.width, hidden, act=cfg.act)
        self.norm_query = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, hidden, act=cfg.act) if cfg.text_input else None
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.text_input else None

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        attn_mask: torch.Tensor | None,
        context: torch.Tensor | None,
        past: KeyValue | None = None,
        context_kv: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """x [B, N, D], its first `num_queries` rows queries; `past` keys and values prepended to this layer's
        (the queries' cache for text-only passes); `context_kv` the image's cross-attention keys and values
        when precomputed. Returns the new rows and this layer's self-attention keys and values."""
        out, kv = self.attn.cached(x, past, attn_mask=attn_mask)
        x = self.norm1(x + out)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries:
            if self.cross_attn is not None:
                if context_kv is None:
                    context_kv = self.cross_attn.context_kv(context)
                queries = self.norm_cross(queries + self.cross_attn.cached(queries, None, context_kv=context_kv)[0])
            queries = self.norm_query(queries + self.mlp_query(queries))
        if text.shape[1]:
            if self.mlp is None:
                raise ValueError("this Q-Former has no text side (qformer.text_input: false)")
            text = self.norm2(text + self.mlp(text))
        return torch.cat([queries, text], dim=1), kv


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, context_width: int):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.width) * 0.02)
        self.word_embeddings = self.position_embeddings = None
        if cfg.text_input:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.context_length, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, context_width, cfg.has_cross_attention(index)) for index in range(cfg.layers)
        )
        for module in self.modules():  # BERT's initialisation; the queries keep N(0, 0.02)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def _embed(self, ids: torch.Tensor | None, queries: bool, start: int = 0) -> torch.Tensor:
        """[queries; word + position embeddings of ids from position `start`], LayerNorm over both."""
        parts = []
        if queries:
            batch = ids.shape[0] if ids is not None else 1
            parts.append(self.query_tokens.expand(batch, -1, -1))
        if ids is not None and ids.shape[1]:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former has no text side (qformer.text_input: false)")
            end = start + ids.shape[1]
            if end > self.cfg.context_length:
                raise ValueError(f"text of {end} tokens exceeds the Q-Former's context_length {self.cfg.context_length}")
            positions = torch.arange(start, end, device=ids.device)
            parts.append(self.word_embeddings(ids) + self.position_embeddings(positions))
        return self.embed_norm(torch.cat(parts, dim=1))

    def _run(
        self,
        x: torch.Tensor,
        num_queries: int,
        mask: torch.Tensor | None,
        context: torch.Tensor | None,
        past: list[KeyValue] | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        present = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, num_queries, mask, context, None if past is None else past[index])
            present.append(kv)
        return x, present

    def query_states(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, list[KeyValue]]:
        """The queries alone, cross-attending to the image tokens [B, N, Dv]: (Z [B, Q, D], each layer's
        query keys and values, which the ITG pass and generation reuse)."""
        x = self._embed(None, queries=True).expand(image_tokens.shape[0], -1, -1)
        return self._run(x, self.cfg.num_queries, None, image_tokens)

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text alone, bidirectional over its real tokens (ITC's text pass): [B, L, D]."""
        attend = mask.bool()[:, None, None, :]
        return self._run(self._embed(ids, queries=False), 0, attend, None)[0]

    def joint_states(
        self, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, kind: MaskKind = "itm"
    ) -> torch.Tensor:
        """Queries and text in one pass under a mask of `attention_mask`: [B, Q + L, D]."""
        nq = self.cfg.num_queries
        x = self._embed(ids, queries=True)
        return self._run(x, nq, attention_mask(kind, nq, mask), image_tokens)[0]

    def decoder_states(self, ids: torch.Tensor, mask: torch.Tensor, query_kv: list[KeyValue]) -> torch.Tensor:
        """ITG's text pass: text rows [B, L, D] seeing every query (through their cached keys and values)
        and the real text up to themselves."""
        nq = self.cfg.num_queries
        keys = torch.cat([torch.ones(mask.shape[0], nq, dtype=mask.dtype, device=mask.device), mask], dim=1)
        attend = incremental_causal_mask(keys, ids.shape[1])
        return self._run(self._embed(ids, queries=False), 0, attend, None, query_kv)[0]

    def decode(
        self, ids: torch.Tensor, key_mask: torch.Tensor, cache: list[KeyValue]
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Generation: states [B, t, D] of the newest tokens given the cache (the queries' keys and values,
        then the earlier text's); key_mask [B, Q + past + t]."""
        start = cache[0][0].shape[2] - self.cfg.num_queries  # text positions start at 0 after the queries
        attend = incremental_causal_mask(key_mask, ids.shape[1])
        return self._run(self._embed(ids, queries=False, start=start), 0, attend, None, cache)
