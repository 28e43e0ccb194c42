"""Hugging Face BLIP-2 folders: `Blip2ForConditionalGeneration` (family `blip2`),
`Blip2ForImageTextRetrieval` (family `blip2_qformer`) and `InstructBlipForConditionalGeneration` (family
`instructblip`), both directions (spec `blip2-family.md` §8).

Facts the mapping rests on (transformers 5.x, checked against 4.55's and 4.45's layouts in the spec):
- The vision tower is EVA's ViT without a pre-norm or a final norm inside the tower; HF's
  `vision_model.post_layernorm` is LAVIS's trainable `ln_vision` (eps from the vision config, 1e-6).
  Its fused `qkv` bias is LAVIS's q_bias, zeros, v_bias: a plain q/k/v bias here.
- `qformer.layernorm` normalises [queries; text embeddings]; retrieval keeps the word and position
  embeddings at the top level (`embeddings.*`) and the text feed-forward in every layer.
- The language model is `AutoModelForCausalLM` (OPT, Llama, ...) or `AutoModelForSeq2SeqLM` (Flan-T5) under
  `language_model.`, the same keys as vlp's; its output layer may be tied to its input embeddings and
  missing from the file. A T5's soft prompt and question go to its encoder, the caption to its decoder.
- InstructBLIP keeps the Q-Former's word and position embeddings and their LayerNorm under
  `qformer.embeddings.*`, and its instruction tokenizer in the folder's `qformer_tokenizer/`; its Q-Former
  reads [queries; instruction] with one bidirectional mask, text positions from 0, as vlp's does.
- No ITG head and no ITC temperature in HF: a retrieval folder loads with them at initialisation, and
  they are not exported.
- Image placeholders (spec §8.6): from transformers 4.55 on, `input_ids` must hold `num_query_tokens`
  `image_token_index` ids before the text, which the soft prompt replaces; before 4.47 the soft prompt
  was prepended to the text instead. vlp's `Blip2` always prepends (the text it gets has no placeholders),
  which is the same layout; an exported folder writes `image_token_index` and a tokenizer holding
  `<image>` at that id, so both conventions read it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vlp.assets import IMAGE, INSTRUCTION, TEXT, Assets
from vlp.checkpoint import Pretrained, without_aliases, write_safetensors
from vlp.convert.common import (
    ConversionError,
    activation_from_hf,
    blip_image_processor,
    image_config_from_hf,
    read_hf_config,
    read_hf_weights,
    save_hf_tokenizer,
)
from vlp.convert.hf_blip import vit_rules
from vlp.convert.keymap import Rule, from_vlp, layer_rules, prefixed, rule, to_vlp, weight_and_bias
from vlp.convert.tokenizers import tokenizer_from_path
from vlp.models.blip2 import Blip2, Blip2Config, Blip2Qformer, Blip2QformerConfig
from vlp.models.instructblip import InstructBlip, InstructBlipConfig
from vlp.registry import FAMILIES
from vlp.towers import VisionConfig
from vlp.towers.frozen_image import FrozenImageConfig
from vlp.towers.qformer import QFormerConfig

log = logging.getLogger("vlp.convert")

GENERATION, RETRIEVAL = "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval"
INSTRUCT = "InstructBlipForConditionalGeneration"
ARCHITECTURES = (GENERATION, RETRIEVAL, INSTRUCT)
QFORMER_TOKENIZER = "qformer_tokenizer"
IMAGE_TOKEN = "<image>"
# The Q-Former tokenizer's lengths: LAVIS trains with 32 tokens (retrieval evaluates with 35).
QFORMER_CONTEXT = 32
# A decoder-only LM's prompt and caption together.
LM_CONTEXT = 64
# InstructBLIP's instructions, in either tokenizer (LAVIS's max_txt_len).
INSTRUCTION_CONTEXT = 128


def _hf_config(config: dict[str, Any]) -> Any:
    """The config as transformers fills it (the defaults of every sub-config)."""
    from transformers import Blip2Config as HfBlip2Config
    from transformers import InstructBlipConfig as HfInstructBlipConfig

    cls = HfInstructBlipConfig if config.get("model_type") == "instructblip" else HfBlip2Config
    return cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})


def architecture_of(config: dict[str, Any], where: str) -> str:
    names = [a for a in config.get("architectures") or [] if a in ARCHITECTURES]
    if not names:
        raise ConversionError(f"{where}: 'architectures' names none of {', '.join(ARCHITECTURES)}")
    return names[0]


def frozen_image_config_from_hf(vision: Any) -> FrozenImageConfig:
    if not getattr(vision, "qkv_bias", True):
        raise ConversionError("vision_config.qkv_bias false: vlp's ViT has q/k/v biases (BLIP-2's EVA ViT does)")
    tower = VisionConfig(
        image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
        layers=vision.num_hidden_layers, heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
        act=activation_from_hf(vision.hidden_act, "vision_config"), norm_eps=vision.layer_norm_eps,
        patch_bias=True, ln_pre=False, ln_post=False,
    )  # fmt: skip
    # HF's tower is already the 39 blocks BLIP-2 keeps; the parity of a conversion needs fp32.
    return FrozenImageConfig(vision=tower, vision_feature_layer=-1, vision_precision="fp32",
                             ln_vision_eps=vision.layer_norm_eps)


def qformer_config_from_hf(hf: Any, text_input: bool, tokenizer: Any | None) -> QFormerConfig:
    q = hf.qformer_config

    def token(name: str, default: int) -> int:
        found = tokenizer.token_id(name) if tokenizer is not None else None
        return default if found is None else found

    return QFormerConfig(
        vocab_size=q.vocab_size, context_length=q.max_position_embeddings, width=q.hidden_size,
        layers=q.num_hidden_layers, heads=q.num_attention_heads, mlp_ratio=q.intermediate_size / q.hidden_size,
        act=activation_from_hf(q.hidden_act, "qformer_config"), norm_eps=q.layer_norm_eps,
        num_queries=hf.num_query_tokens, cross_attention_freq=q.cross_attention_frequency, text_input=text_input,
        pad_token_id=q.pad_token_id, cls_token_id=token("[CLS]", 101), eos_token_id=token("[SEP]", 102),
        dec_token_id=token("[DEC]", q.vocab_size - 1),
    )  # fmt: skip


def _vision_rules(layers: int) -> list[Rule]:
    """HF's post_layernorm is BLIP-2's ln_vision, outside vlp's tower."""
    rules = [*prefixed(vit_rules(layers), "visual.", ""), *weight_and_bias("ln_vision", "post_layernorm")]
    return prefixed(rules, "image_encoder.", "vision_model.")


def _qformer_rules(cfg: QFormerConfig, instruct: bool = False) -> list[Rule]:
    """Retrieval keeps the text embeddings at the top level, InstructBLIP inside the Q-Former with its norm."""
    embeddings, norm = ("qformer.embeddings", "qformer.embeddings.layernorm") if instruct else ("embeddings",
                                                                                                "qformer.layernorm")
    rules = [rule("qformer.query_tokens", "query_tokens"), *weight_and_bias("qformer.embed_norm", norm)]
    if cfg.text_input:
        rules += [rule("qformer.word_embeddings.weight", f"{embeddings}.word_embeddings.weight"),
                  rule("qformer.position_embeddings.weight", f"{embeddings}.position_embeddings.weight")]
    for i in range(cfg.layers):
        pairs: list[tuple[str | tuple[str, ...], str | tuple[str, ...]]] = [
            ("attn.qkv_proj", tuple(f"attention.attention.{n}" for n in ("query", "key", "value"))),
            ("attn.out_proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
            ("mlp_query.fc1", "intermediate_query.dense"), ("mlp_query.fc2", "output_query.dense"),
            ("norm_query", "output_query.LayerNorm"),
        ]  # fmt: skip
        if cfg.has_cross_attention(i):
            pairs += [
                ("cross_attn.q_proj", "crossattention.attention.query"),
                ("cross_attn.kv_proj", tuple(f"crossattention.attention.{n}" for n in ("key", "value"))),
                ("cross_attn.out_proj", "crossattention.output.dense"), ("norm_cross", "crossattention.output.LayerNorm"),
            ]  # fmt: skip
        if cfg.text_input:
            pairs += [("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("norm2", "output.LayerNorm")]
        # One layer at a time: only every n-th has cross-attention.
        rules += [Rule(tuple(k.replace("layers.0.", f"layers.{i}.") for k in r.ours),
                       tuple(k.replace("layer.0.", f"layer.{i}.") for k in r.theirs), r.transform)
                  for r in layer_rules(1, "qformer.layers", "qformer.encoder.layer", pairs)]
    return rules


def blip2_rules(model: Blip2 | Blip2Qformer) -> list[Rule]:
    """The key map of a vlp BLIP-2 model to its HF architecture (the language model aside)."""
    rules = _vision_rules(len(model.image_encoder.visual.blocks)) + _qformer_rules(model.cfg.qformer,
                                                                                    isinstance(model, InstructBlip))
    if isinstance(model, Blip2Qformer):
        return rules + [*weight_and_bias("vision_proj", "vision_projection"),
                        *weight_and_bias("text_proj", "text_projection"), *weight_and_bias("itm_head", "itm_head")]
    return rules + weight_and_bias("language_projection", "language_projection")


def load_hf_blip2(folder: Path, *, tokenizer: str | Path | None = None, **_: Any) -> Pretrained:
    """A BLIP-2 folder: a captioning model with its causal language model, or the retrieval model."""
    config = read_hf_config(folder)
    architecture = architecture_of(config, str(folder / "config.json"))
    hf = _hf_config(config)
    image = frozen_image_config_from_hf(hf.vision_config)
    if architecture == RETRIEVAL:
        text_tokenizer = tokenizer_from_path(tokenizer or folder, context_length=QFORMER_CONTEXT, model_type="blip2")
        model_cfg: Any = Blip2QformerConfig(image=image, qformer=qformer_config_from_hf(hf, True, text_tokenizer),
                                            embed_dim=hf.image_text_hidden_size)
        model: Blip2 | Blip2Qformer = Blip2Qformer(model_cfg)
    elif architecture == INSTRUCT:
        kind = "causal_lm" if hf.use_decoder_only_language_model else "seq2seq_lm"
        text_tokenizer = tokenizer_from_path(tokenizer or folder, context_length=INSTRUCTION_CONTEXT, model_type=kind)
        if not (folder / QFORMER_TOKENIZER).is_dir():
            raise ConversionError(f"{folder}: an InstructBLIP folder needs its Q-Former's tokenizer in "
                                  f"{QFORMER_TOKENIZER}/ (InstructBlipProcessor.save_pretrained writes it)")
        qformer_tokenizer = tokenizer_from_path(folder / QFORMER_TOKENIZER, context_length=INSTRUCTION_CONTEXT,
                                                model_type="blip2")
        model_cfg = InstructBlipConfig(image=image, qformer=qformer_config_from_hf(hf, True, qformer_tokenizer),
                                       language_model=hf.text_config.to_dict(), lm_precision="fp32")
        model = InstructBlip(model_cfg)
    else:
        kind = "causal_lm" if hf.use_decoder_only_language_model else "seq2seq_lm"
        text_tokenizer = tokenizer_from_path(tokenizer or folder, context_length=LM_CONTEXT, model_type=kind)
        model_cfg = Blip2Config(image=image, qformer=qformer_config_from_hf(hf, False, None),
                                language_model=hf.text_config.to_dict(), lm_precision="fp32")
        model = Blip2(model_cfg)
    state, source = read_hf_weights(folder)
    lm_state = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    expected = model.state_dict()
    converted = to_vlp(state, blip2_rules(model), expected, source=str(source), ignore=("position_ids",))
    missing, _ = model.load_state_dict(converted, strict=False)
    if isinstance(model, Blip2):
        _load_language_model(model, lm_state, source)
        missing = [k for k in missing if not k.startswith("language_model.")]
    elif missing:
        log.info("%s holds no ITG head or temperature (HF has none): %s left at initialisation", folder,
                 ", ".join(sorted({k.split(".")[0] for k in missing})))
    model.eval()
    # BLIP-2's processor (BlipImageProcessor) resizes to a square, bicubic, with CLIP's mean and std.
    image_config = image_config_from_hf(folder, image.vision.image_size, crop=False)
    family = FAMILIES[{RETRIEVAL: "blip2_qformer", INSTRUCT: "instructblip"}.get(architecture, "blip2")]
    tokenizers = {TEXT: text_tokenizer, **({INSTRUCTION: qformer_tokenizer} if architecture == INSTRUCT else {})}
    return Pretrained(family, model_cfg, model, Assets(tokenizers, {IMAGE: image_config}), folder)


@torch.no_grad()
def _load_language_model(model: Blip2, state: dict[str, torch.Tensor], source: Path) -> None:
    lm = model.language_model
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {name for name, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
    missing = [k for k in missing if k not in tied and "rotary" not in k]
    if missing or unexpected:
        raise ConversionError(f"{source}: the language model's weights do not fit its config: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")


def export_hf_blip2(pretrained: Pretrained, out: Path, architecture: str | None = None) -> Path:
    """Write a folder `transformers.Blip2ForConditionalGeneration` (a stage-2 model),
    `Blip2ForImageTextRetrieval` (a stage-1 model) or `InstructBlipForConditionalGeneration` loads,
    placeholders and all (see the module docstring)."""
    model = pretrained.model
    instruct = isinstance(model, InstructBlip)
    expected = RETRIEVAL if isinstance(model, Blip2Qformer) else INSTRUCT if instruct else GENERATION
    if instruct and not model.cfg.qformer.text_input:
        raise ConversionError("Hugging Face's InstructBLIP always reads the instruction in its Q-Former; this model "
                              "was trained without (qformer.text_input: false)")
    if architecture not in (None, expected):
        raise ConversionError(f"{pretrained.family.name} models export as {expected}, not {architecture}")
    vision = model.cfg.image.vision
    if (not isinstance(vision, VisionConfig) or vision.ln_pre or not vision.patch_bias or not vision.class_token
            or model.cfg.image.vision_feature_layer != -1 or vision.ln_post or vision.stem_channels):
        raise ConversionError("only BLIP-2's own ViT (class token, patch projection with bias, no pre- or post-norm, every block "
                              "used) has a Hugging Face equivalent")
    state = from_vlp(model.state_dict(), blip2_rules(model))
    q = model.cfg.qformer
    config: dict[str, Any] = {
        "architectures": [expected], "model_type": "instructblip" if instruct else "blip-2",
        "num_query_tokens": q.num_queries,
        "vision_config": {
            "hidden_size": vision.width, "intermediate_size": round(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(vision.act, vision.act),
            "layer_norm_eps": model.cfg.image.ln_vision_eps, "qkv_bias": True,
        },
        "qformer_config": {
            "vocab_size": q.vocab_size, "hidden_size": q.width, "num_hidden_layers": q.layers,
            "num_attention_heads": q.heads, "intermediate_size": round(q.width * q.mlp_ratio),
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(q.act, q.act), "layer_norm_eps": q.norm_eps,
            "max_position_embeddings": q.context_length, "cross_attention_frequency": q.cross_attention_freq,
            "encoder_hidden_size": vision.width, "pad_token_id": q.pad_token_id,
            "use_qformer_text_input": q.text_input, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        },
    }  # fmt: skip
    if vision.norm_eps != model.cfg.image.ln_vision_eps:
        raise ConversionError(f"HF uses one LayerNorm eps for the tower and ln_vision; this model has "
                              f"{vision.norm_eps} and {model.cfg.image.ln_vision_eps}")
    tokenizer = pretrained.tokenizer
    if isinstance(model, Blip2Qformer):
        config["image_text_hidden_size"] = model.cfg.embed_dim
    else:
        lm = model.language_model
        # The placeholder the processor puts before the text (§8.6): the id after the tokenizer's vocabulary,
        # within the language model's embedding rows.
        image_token = tokenizer.token_id(IMAGE_TOKEN)
        if image_token is None:
            tokenizer.backend.add_special_tokens([IMAGE_TOKEN])
            image_token = tokenizer.token_id(IMAGE_TOKEN)
        if image_token >= lm.get_input_embeddings().weight.shape[0]:
            raise ConversionError(f"the language model has {lm.get_input_embeddings().weight.shape[0]} embedding "
                                  f"rows and no free one for the image placeholder (id {image_token})")
        config["text_config"] = lm.config.to_dict()
        config["image_token_index"] = image_token
        config["tie_word_embeddings"] = bool(getattr(lm.config, "tie_word_embeddings", False))
        state.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    # A tied output layer is written once, as transformers writes it.
    unique = {k: v.contiguous() for k, v in without_aliases(state).items()}
    write_safetensors(unique, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    image = pretrained.image_config
    (out / "preprocessor_config.json").write_text(json.dumps(blip_image_processor(image), indent=1))
    save_hf_tokenizer(tokenizer, out)
    if instruct:
        (out / QFORMER_TOKENIZER).mkdir(exist_ok=True)
        save_hf_tokenizer(pretrained.assets.tokenizer(INSTRUCTION, where=pretrained.path), out / QFORMER_TOKENIZER)
    if not isinstance(model, Blip2Qformer):
        processor = "InstructBlipProcessor" if instruct else "Blip2Processor"
        (out / "processor_config.json").write_text(json.dumps({"processor_class": processor,
                                                               "num_query_tokens": q.num_queries}, indent=1))
    return out
