"""The text towers, both built from `layers.TransformerBlock`:

- `TextTransformer`: CLIP's pre-norm tower (token + learned position embeddings, final LayerNorm, pooled
  at the end-of-text token or elsewhere), causal or bidirectional; CLIP, SigLIP and CoCa's unimodal half.
- `BertTextTransformer`: BERT's post-norm tower (embeddings LayerNorm), optionally cross-attending to a
  context in every layer: BLIP's multimodal mixture of encoder-decoder, and the Q-Former's base.

Both name their position count `context_length`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.layers import Activation, KeyValue, TransformerBlock, causal_mask, incremental_causal_mask, padding_mask


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

    def special_tokens(self) -> dict[str, tuple[str, int]]:
        """config key -> (token, id) the tokenizer must agree on: none, the tower writes no token itself."""
        return {}


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, *, cls_token: bool = False):
        """cls_token: a learned CLS embedding with a position of its own after the context (CoCa's)."""
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length + cls_token, cfg.width) * 0.01)
        if cls_token:
            self.cls_embedding = nn.Parameter(torch.randn(cfg.width) * 0.01)
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

    def decode(
        self, inputs: torch.Tensor, key_mask: torch.Tensor, cache: list[KeyValue] | None
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Causal states [B, t, D] (before the final LayerNorm) of the newest inputs given the cached earlier
        ones: token ids [B, t], or embeddings [B, t, D] (a prefix from another model). key_mask [B, past + t]."""
        past = 0 if cache is None else cache[0][0].shape[2]
        new = inputs.shape[1]
        if past + new > self.cfg.context_length:
            raise ValueError(f"text of {past + new} tokens exceeds context_length {self.cfg.context_length}")
        x = self.token_embedding(inputs) if inputs.dim() == 2 else inputs
        x = x + self.pos_embed[past : past + new].to(x.dtype)
        mask = incremental_causal_mask(key_mask, new)
        present = []
        for index, block in enumerate(self.blocks):
            x, kv = block.decode(x, None if cache is None else cache[index], mask)
            present.append(kv)
        return x, present


TextMode = Literal["text", "multimodal", "decoder"]


@dataclass
class BertTextConfig:
    """The BERT-style tower (post-norm layers, embeddings LayerNorm), as BLIP's MED configures it."""

    vocab_size: PositiveInt = 30524
    context_length: PositiveInt = 512
    width: PositiveInt = 768
    layers: PositiveInt = 12
    heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    act: Activation = "gelu"
    norm_eps: PositiveFloat = 1e-12
    # BLIP shares everything between encoder and decoder except the self-attention layers; `all` and
    # `none` are its ablations.
    share: Literal["all_but_self_attention", "all", "none"] = "all_but_self_attention"
    # Tokens the model writes itself: [ENC] and [DEC] replace the first token; [SEP] ends a caption. The
    # trainer checks each id against the tokenizer.
    pad_token_id: int = 0
    eos_token_id: int = 102
    enc_token_id: int = 30523
    dec_token_id: int = 30522

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")

    def special_tokens(self) -> dict[str, tuple[str, int]]:
        """config key -> (token, id) the tokenizer must agree on."""
        return {
            "pad_token_id": ("[PAD]", self.pad_token_id),
            "eos_token_id": ("[SEP]", self.eos_token_id),
            "enc_token_id": ("[ENC]", self.enc_token_id),
            "dec_token_id": ("[DEC]", self.dec_token_id),
        }


class BertTextTransformer(nn.Module):
    """Word + position embeddings, LayerNorm, post-norm layers. [B, L] ids -> [B, L, D] states, in one of
    three modes: `text` (bidirectional, no cross-attention), `multimodal` (bidirectional, cross-attending
    to a context), `decoder` (causal, cross-attending, with the layers' own causal self-attention when
    `causal_self_attention`)."""

    def __init__(
        self,
        cfg: BertTextConfig,
        context_width: int,
        causal_self_attention: bool,
        make_layer: Callable[[int], nn.Module] | None = None,
    ):
        """make_layer(index) builds layers other than the standard one (NLVR2's two-image layers)."""
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.context_length, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        make_layer = make_layer or (lambda index: TransformerBlock(
            cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps,
            context_dim=context_width, post_norm=True, causal_self_attention=causal_self_attention,
        ))  # fmt: skip
        self.layers = nn.ModuleList(make_layer(index) for index in range(cfg.layers))
        for module in self.modules():  # BERT's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Normalised word + position embeddings of ids [B, t] at positions start .. start + t - 1."""
        end = start + ids.shape[1]
        if end > self.cfg.context_length:
            raise ValueError(f"text of {end} tokens exceeds context_length {self.cfg.context_length}")
        positions = torch.arange(start, end, device=ids.device)
        return self.embed_norm(self.word_embeddings(ids) + self.position_embeddings(positions))

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        mode: TextMode,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """context [B, M, Dc]: what the grounded modes cross-attend to (image tokens, or BLIP-VQA's question
        states); context_mask [B, M], 1 = real, when the context has padding."""
        if mode != "text" and context is None:
            raise ValueError(f"text mode '{mode}' cross-attends to a context (image tokens); none was given")
        x = self._embed(ids, 0)
        attend = padding_mask(mask)  # [B, 1, 1, L]
        if mode == "decoder":
            attend = attend & causal_mask(ids.shape[1], ids.device)
        cross_mask = None if context_mask is None else padding_mask(context_mask)
        for layer in self.layers:
            x = layer(x, attn_mask=attend, context=context, context_mask=cross_mask, decoder=mode == "decoder",
                      text_only=mode == "text")
        return x

    def decode(
        self,
        ids: torch.Tensor,
        key_mask: torch.Tensor,
        cache: list[KeyValue] | None,
        cross_kv: list[KeyValue],
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Decoder states [B, t, D] of the newest `t` tokens given the cached earlier ones.
        key_mask [B, past + t]: 1 where a position (earlier or new) is a real token."""
        past = 0 if cache is None else cache[0][0].shape[2]
        x = self._embed(ids, past)
        mask = incremental_causal_mask(key_mask, ids.shape[1])
        cross_mask = None if context_mask is None else padding_mask(context_mask)
        present = []
        for index, layer in enumerate(self.layers):
            x, kv = layer.decode(x, None if cache is None else cache[index], mask, context_kv=cross_kv[index],
                                 context_mask=cross_mask)
            present.append(kv)
        return x, present
