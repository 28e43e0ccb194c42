"""Transformer building blocks shared by every model family."""

from vlp.layers.attention import Attention, causal_mask, incremental_causal_mask, padding_mask
from vlp.layers.block import CrossAttentionBlock, KeyValue, TransformerBlock
from vlp.layers.embedding import PatchEmbed, resize_pos_embed
from vlp.layers.mlp import Activation, Mlp, QuickGELU, make_activation
from vlp.layers.pooling import AttentionalPooler, AttentionPool

__all__ = [
    "Activation", "Attention", "AttentionPool", "AttentionalPooler", "CrossAttentionBlock", "KeyValue", "Mlp",
    "PatchEmbed", "QuickGELU", "TransformerBlock", "causal_mask", "incremental_causal_mask", "make_activation",
    "padding_mask", "resize_pos_embed",
]
