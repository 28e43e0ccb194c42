"""A Q-Former started from a BERT checkpoint folder, as BLIP-2 starts its Q-Former from bert-base-uncased
(spec `blip2-family.md` §3.2): embeddings, self-attention and the text feed-forward come from BERT, the
query feed-forward is a copy of the text one, cross-attention and the queries start fresh. The [DEC] token
BLIP-2 adds is one more row of the word embeddings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlp.convert.common import ConversionError, activation_from_hf, read_hf_config, read_hf_weights
from vlp.convert.keymap import rule, to_vlp
from vlp.towers.qformer import QFormer, QFormerConfig


def _token_id(folder: Path, token: str) -> int:
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise ConversionError(f"{folder} has no vocab.txt to find {token} in")
    tokens = vocab.read_text(encoding="utf-8").split("\n")
    if token not in tokens:
        raise ConversionError(f"{folder / 'vocab.txt'} has no {token}")
    return tokens.index(token)


def qformer_config_from_bert(folder: str | Path, base: QFormerConfig) -> QFormerConfig:
    """`base` (queries, cross-attention frequency) with the BERT folder's sizes and token ids; [DEC] is the
    id after BERT's vocabulary."""
    folder = Path(folder)
    config = read_hf_config(folder)
    if config.get("model_type") != "bert":
        raise ConversionError(f"{folder}: a Q-Former starts from a BERT checkpoint; this one is a "
                              f"{config.get('model_type')!r}")
    width = config["hidden_size"]
    return dataclasses.replace(
        base, vocab_size=config["vocab_size"] + 1, context_length=config["max_position_embeddings"], width=width,
        layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
        mlp_ratio=config["intermediate_size"] / width, act=activation_from_hf(config["hidden_act"], str(folder)),
        norm_eps=config["layer_norm_eps"], pad_token_id=config.get("pad_token_id", 0),
        cls_token_id=_token_id(folder, "[CLS]"), eos_token_id=_token_id(folder, "[SEP]"),
        dec_token_id=config["vocab_size"],
    )


def _rules(layers: int, text_input: bool) -> list:
    """BERT -> the Q-Former; without a text side (stage 2 from BERT) its FFN goes to the query FFN."""
    ffn, norm = ("mlp", "norm2") if text_input else ("mlp_query", "norm_query")
    rules = [rule("embed_norm.weight", "embeddings.LayerNorm.weight"), rule("embed_norm.bias", "embeddings.LayerNorm.bias")]
    if text_input:
        rules.append(rule("position_embeddings.weight", "embeddings.position_embeddings.weight"))
    for i in range(layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            rules += [
                rule(f"{ours}attn.qkv_proj.{p}", tuple(f"{theirs}attention.self.{n}.{p}" for n in ("query", "key", "value"))),
                rule(f"{ours}attn.out_proj.{p}", f"{theirs}attention.output.dense.{p}"),
                rule(f"{ours}norm1.{p}", f"{theirs}attention.output.LayerNorm.{p}"),
                rule(f"{ours}{ffn}.fc1.{p}", f"{theirs}intermediate.dense.{p}"),
                rule(f"{ours}{ffn}.fc2.{p}", f"{theirs}output.dense.{p}"),
                rule(f"{ours}{norm}.{p}", f"{theirs}output.LayerNorm.{p}"),
            ]
    return rules


@torch.no_grad()
def load_bert_into_qformer(qformer: QFormer, folder: str | Path) -> None:
    """Copy a BERT checkpoint's weights into a Q-Former built from `qformer_config_from_bert`."""
    folder = Path(folder)
    state, path = read_hf_weights(folder)
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("cls.", "pooler."))}
    words = state.pop("embeddings.word_embeddings.weight")
    # The Q-Former has no token types; BERT adds type 0 to every token, folded into the positions here so
    # that the text side computes what BERT computed.
    token_type = state.pop("embeddings.token_type_embeddings.weight")[0]
    text_input = qformer.cfg.text_input
    if not text_input:
        state.pop("embeddings.position_embeddings.weight")
    ours = to_vlp(state, _rules(qformer.cfg.layers, text_input), qformer.state_dict(), source=str(path),
                  ignore=("position_ids",))
    if not text_input:
        _load(qformer, ours, path)
        return
    ours["position_embeddings.weight"] = ours["position_embeddings.weight"] + token_type
    rows = qformer.word_embeddings.weight.shape[0]
    if words.shape[0] != rows - 1 or words.shape[1] != qformer.cfg.width:
        raise ConversionError(f"{path}: word embeddings {tuple(words.shape)} do not fit a Q-Former of "
                              f"{rows} tokens x {qformer.cfg.width}")
    ours["word_embeddings.weight"] = torch.cat([words, qformer.word_embeddings.weight[-1:]])  # [DEC] stays new
    for i in range(qformer.cfg.layers):  # the query feed-forward starts as the text one (LAVIS, stage 1)
        for ours_name, theirs_name in (("mlp_query", "mlp"), ("norm_query", "norm2")):
            for key in [k for k in ours if k.startswith(f"layers.{i}.{theirs_name}.")]:
                ours[key.replace(f".{theirs_name}.", f".{ours_name}.")] = ours[key].clone()
    _load(qformer, ours, path)


def _load(qformer: QFormer, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load what BERT gives; the cross-attention and the queries keep their initialisation."""
    _, unexpected = qformer.load_state_dict(weights, strict=False)
    if unexpected:
        raise ConversionError(f"{path}: tensors the Q-Former does not have: {unexpected[:4]}")
