"""Hugging Face BLIP folders: `BlipForConditionalGeneration`, `BlipForImageTextRetrieval` and
`BlipForQuestionAnswering`, both directions.

Facts the mapping rests on (transformers 5.x, spec §6.1):
- One `BlipConfig` with a text and a vision config; the text layers always have cross-attention
  (`is_decoder` true), whose keys and values read `encoder_hidden_size` wide inputs.
- Captioning holds only the decoder (`text_decoder.bert` + the BERT LM head `text_decoder.cls`),
  retrieval only the encoder (`text_encoder`) with `vision_proj`, `text_proj` and `itm_head`: each loads
  into a vlp BLIP with `share: all`, one text transformer, the other heads left at initialisation.
- The LM head's weight is tied to the decoder's word embeddings and its bias to `predictions.bias`
  unless `tie_word_embeddings` is false; tied copies may be missing from a file.
- HF feeds the ITM head and the VQA question encoder the text as tokenised, [CLS] first; BLIP (and vlp)
  replace it with [ENC]. vlp keeps BLIP's rule: to reproduce HF's outputs, give HF [ENC]-first ids.
- Vision LayerNorm eps defaults to 1e-5 in HF, 1e-6 in BLIP: read from the config, never assumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vlp.assets import IMAGE, TEXT, Assets
from vlp.checkpoint import Pretrained, write_safetensors
from vlp.convert.common import (
    ConversionError,
    activation_from_hf,
    blip_image_processor,
    image_config_from_hf,
    read_hf_config,
    read_hf_weights,
    save_hf_tokenizer,
)
from vlp.convert.keymap import Rule, from_vlp, layer_rules, prefixed, rule, to_vlp, weight_and_bias
from vlp.convert.tokenizers import tokenizer_from_path
from vlp.models.blip import Blip, BlipConfig, BlipVqa, BlipVqaConfig
from vlp.registry import FAMILIES
from vlp.towers import BertTextConfig, VisionConfig

log = logging.getLogger("vlp.convert")

CAPTIONING, RETRIEVAL, VQA = "BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"
ARCHITECTURES = (CAPTIONING, RETRIEVAL, VQA)
_TEXT_DEFAULTS = {
    "vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 512, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0,
}  # fmt: skip
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 384, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
IGNORED_KEYS = ("position_ids", "cls.predictions.bias")
# BLIP's captions are short; its fine-tuning used 35-40 tokens.
CONTEXT_LENGTH = 40


def architecture_of(config: dict[str, Any], where: str) -> str:
    names = [a for a in config.get("architectures") or [] if a in ARCHITECTURES]
    if not names:
        raise ConversionError(
            f"{where}: 'architectures' names none of {', '.join(ARCHITECTURES)}: vlp cannot tell which BLIP heads it holds"
        )
    return names[0]


def configs_from_hf(config: dict[str, Any], enc_token_id: int) -> tuple[VisionConfig, BertTextConfig]:
    text = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    vision = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    vision_cfg = VisionConfig(
        image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
        layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], act=activation_from_hf(vision["hidden_act"], "vision_config"),
        norm_eps=vision["layer_norm_eps"], patch_bias=True, ln_pre=False,
    )  # fmt: skip
    if text["encoder_hidden_size"] != vision["hidden_size"]:
        raise ConversionError(
            f"text_config.encoder_hidden_size {text['encoder_hidden_size']} is not the vision width {vision['hidden_size']}"
        )
    text_cfg = BertTextConfig(
        vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"], width=text["hidden_size"],
        layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        mlp_ratio=text["intermediate_size"] / text["hidden_size"], act=activation_from_hf(text["hidden_act"], "text_config"),
        norm_eps=text["layer_norm_eps"], share="all", pad_token_id=text["pad_token_id"],
        eos_token_id=text["sep_token_id"], enc_token_id=enc_token_id, dec_token_id=text["bos_token_id"],
    )  # fmt: skip
    return vision_cfg, text_cfg


def vit_rules(layers: int) -> list[Rule]:
    """vlp's ViT (class token, patch bias, no pre-norm) <-> the tower of HF's BLIP and BLIP-2 vision models,
    their final LayerNorm aside."""
    rules = [
        rule("class_embedding", "embeddings.class_embedding", "unsqueeze2"),
        rule("pos_embed", "embeddings.position_embedding", "unsqueeze"),
        *weight_and_bias("patch_embed.proj", "embeddings.patch_embedding"),
    ]
    return rules + layer_rules(layers, "blocks", "encoder.layers", [
        ("norm1", "layer_norm1"), ("attn.qkv_proj", "self_attn.qkv"), ("attn.out_proj", "self_attn.projection"),
        ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
    ])  # fmt: skip


def _vision_rules(layers: int) -> list[Rule]:
    return prefixed([*vit_rules(layers), *weight_and_bias("ln_post", "post_layernorm")], "visual.", "vision_model.")


def _text_rules(layers: int, ours: str, theirs: str, attention: str = "attn", norm: str = "norm1") -> list[Rule]:
    """A BertTextTransformer at `ours` <-> a BlipTextModel at `theirs`; `attention`/`norm` name the
    self-attention that plays HF's (the decoder's own one under share all_but_self_attention)."""
    rules = [
        rule("word_embeddings.weight", "embeddings.word_embeddings.weight"),
        rule("position_embeddings.weight", "embeddings.position_embeddings.weight"),
        *weight_and_bias("embed_norm", "embeddings.LayerNorm"),
    ]
    rules += layer_rules(layers, "layers", "encoder.layer", [
        (f"{attention}.qkv_proj", tuple(f"attention.self.{n}" for n in ("query", "key", "value"))),
        (f"{attention}.out_proj", "attention.output.dense"), (norm, "attention.output.LayerNorm"),
        ("cross_attn.q_proj", "crossattention.self.query"),
        ("cross_attn.kv_proj", tuple(f"crossattention.self.{n}" for n in ("key", "value"))),
        ("cross_attn.out_proj", "crossattention.output.dense"), ("norm_cross", "crossattention.output.LayerNorm"),
        ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("norm2", "output.LayerNorm"),
    ])  # fmt: skip
    return prefixed(rules, ours, theirs)


def _lm_head_rules() -> list[Rule]:
    head = "text_decoder.cls.predictions."
    return [
        *weight_and_bias("lm_head.dense", head + "transform.dense"),
        *weight_and_bias("lm_head.norm", head + "transform.LayerNorm"),
        *weight_and_bias("lm_head.decoder", head + "decoder"),
    ]


def blip_rules(model: Blip | BlipVqa, architecture: str) -> list[Rule]:
    """The key map of a vlp model to one HF BLIP architecture."""
    layers = model.cfg.text.layers
    rules = _vision_rules(model.cfg.vision.layers)
    if architecture == VQA:
        if not isinstance(model, BlipVqa):
            raise ConversionError(f"{VQA} holds a VQA model; this is a {type(model).__name__}")
        return rules + [
            *_text_rules(layers, "text.", "text_encoder."),
            *_text_rules(layers, "answer_decoder.", "text_decoder.bert."),
            *_lm_head_rules(),
        ]
    if not isinstance(model, Blip):
        raise ConversionError(f"{architecture} holds a BLIP pre-training model; this is a {type(model).__name__}")
    if architecture == RETRIEVAL:
        return rules + [
            *_text_rules(layers, "text.", "text_encoder."),
            *weight_and_bias("vision_proj", "vision_proj"),
            *weight_and_bias("text_proj", "text_proj"),
            *weight_and_bias("itm_head", "itm_head"),
        ]
    share = model.cfg.text.share
    if share == "none":
        decoder = _text_rules(layers, "text_decoder.", "text_decoder.bert.")
    elif share == "all_but_self_attention":
        decoder = _text_rules(layers, "text.", "text_decoder.bert.", "decoder_attn", "decoder_norm1")
    else:
        decoder = _text_rules(layers, "text.", "text_decoder.bert.")
    return rules + decoder + _lm_head_rules()


def _untie(state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Fill in the LM head's tied weight and bias the way transformers does when it loads the folder."""
    head = "text_decoder.cls.predictions."
    if head + "transform.dense.weight" not in state:
        return
    embeddings = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    if config.get("tie_word_embeddings", True) or head + "decoder.weight" not in state:
        state[head + "decoder.weight"] = embeddings
    if head + "bias" in state:
        state[head + "decoder.bias"] = state[head + "bias"]


def load_hf_blip(folder: Path, *, tokenizer: str | Path | None = None, **_: Any) -> Pretrained:
    """A BLIP folder: captioning, retrieval or VQA heads."""
    config = read_hf_config(folder)
    architecture = architecture_of(config, str(folder / "config.json"))
    text = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    context = min(CONTEXT_LENGTH, text["max_position_embeddings"])
    text_tokenizer = tokenizer_from_path(tokenizer or folder, context_length=context, model_type="blip")
    enc = text_tokenizer.token_id("[ENC]")
    if enc is None:  # HF's BLIP tokenizers do not register [ENC]; BLIP's id is the one after [DEC]
        enc = text["bos_token_id"] + 1
    vision_cfg, text_cfg = configs_from_hf(config, enc)
    if architecture == VQA:
        model_cfg: Any = BlipVqaConfig(vision=vision_cfg, text=text_cfg)
        model: Blip | BlipVqa = BlipVqa(model_cfg)
    else:
        model_cfg = BlipConfig(vision=vision_cfg, text=text_cfg, embed_dim=config.get("image_text_hidden_size", 256))
        model = Blip(model_cfg)
    state, source = read_hf_weights(folder)
    _untie(state, config)
    converted = to_vlp(state, blip_rules(model, architecture), model.state_dict(), source=str(source),
                       ignore=IGNORED_KEYS)  # fmt: skip
    missing, _ = model.load_state_dict(converted, strict=False)
    if missing:
        log.info("%s holds a %s: %s left at initialisation", folder, architecture, ", ".join(sorted(
            {k.split(".")[0] for k in missing})))  # fmt: skip
    model.eval()
    # BLIP's processor resizes to a square, no crop.
    image_config = image_config_from_hf(folder, vision_cfg.image_size, crop=False)
    family = FAMILIES["blip_vqa" if architecture == VQA else "blip"]
    return Pretrained(family, model_cfg, model, Assets({TEXT: text_tokenizer}, {IMAGE: image_config}), folder)


def _hf_text_config(text: BertTextConfig, vision_width: int, tied: bool) -> dict[str, Any]:
    return {
        "vocab_size": text.vocab_size, "hidden_size": text.width, "encoder_hidden_size": vision_width,
        "intermediate_size": round(text.width * text.mlp_ratio), "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads, "max_position_embeddings": text.context_length,
        "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(text.act, text.act), "layer_norm_eps": text.norm_eps,
        "bos_token_id": text.dec_token_id, "sep_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
        "eos_token_id": text.eos_token_id, "tie_word_embeddings": tied,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }  # fmt: skip


def export_hf_blip(pretrained: Pretrained, out: Path, architecture: str | None = None) -> Path:
    """Write a folder `transformers.<architecture>.from_pretrained` loads: captioning by default for a
    BLIP, question answering for a BLIP-VQA."""
    model = pretrained.model
    architecture = architecture or (VQA if isinstance(model, BlipVqa) else CAPTIONING)
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"unknown BLIP architecture '{architecture}'; expected one of {', '.join(ARCHITECTURES)}")
    vision = model.cfg.vision
    if (not isinstance(vision, VisionConfig) or vision.ln_pre or not vision.patch_bias or not vision.class_token
            or vision.stem_channels):
        raise ConversionError(
            "only BLIP's own ViT (patch projection with bias, class token, no pre-norm) has a Hugging Face equivalent"
        )
    state = from_vlp(model.state_dict(), blip_rules(model, architecture))
    tied = False
    if architecture != RETRIEVAL:
        head = "text_decoder.cls.predictions."
        state[head + "bias"] = state[head + "decoder.bias"].clone()
        tied = torch.equal(state[head + "decoder.weight"], state["text_decoder.bert.embeddings.word_embeddings.weight"])
    config = {
        "architectures": [architecture],
        "model_type": "blip",
        "text_config": _hf_text_config(model.cfg.text, vision.width, tied),
        "vision_config": {
            "hidden_size": vision.width, "intermediate_size": round(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(vision.act, vision.act),
            "layer_norm_eps": vision.norm_eps,
        },
        "image_text_hidden_size": getattr(model.cfg, "embed_dim", 256),
        "tie_word_embeddings": tied,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    image = pretrained.image_config
    if image.resize_mode != "squash":
        log.warning("BLIP's image processor resizes to a square; this model was trained with '%s' resizing",
                    image.resize_mode)  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(blip_image_processor(image), indent=1))
    save_hf_tokenizer(pretrained.tokenizer, out)
    return out
