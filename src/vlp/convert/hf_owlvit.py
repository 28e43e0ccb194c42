"""Hugging Face `OwlViTForObjectDetection` and `Owlv2ForObjectDetection` folders, in and out.

Facts the mapping rests on (transformers 4.x/5.x; spec owlvit.md §6):
- The towers are CLIP's (three q/k/v Linear layers) under `owlvit.` / `owlv2.`, but the vision model spells
  its first norm `pre_layernorm`; the text tower pools at the largest token id (CLIP's end-of-text).
- `owlvit.visual_projection` is not in the released checkpoints (transformers initialises it at random) and
  `owlvit.logit_scale` is CLIP's temperature: detection uses neither, so loading skips them and exporting
  writes the temperature only, as the originals.
- The class-token merge norm is `layer_norm` with the vision tower's eps; the class head's projection has
  `text_config.hidden_size` outputs, so a model converts only when that equals `projection_dim`.
- No box-bias tensor: it is computed from the patch grid. Heads use exact GELU.
- Preprocessing: v1's processor squashes the image to a square (bicubic, PIL); v2's pads it bottom/right to
  a square (0.0 since transformers PR #41938, 0.5 before) and resizes with Gaussian anti-aliasing and linear
  interpolation (scikit-image's resize, in scipy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import CLIP_MEAN, CLIP_STD, ImageConfig
from vlp.checkpoint import Pretrained, write_safetensors
from vlp.convert.common import (
    ConversionError,
    activation_from_hf,
    hf_image_processor_settings,
    read_hf_config,
    read_hf_weights,
    save_hf_tokenizer,
)
from vlp.convert.hf import _DEFAULTS, _block_rules, _hf_tower
from vlp.convert.keymap import from_vlp, prefixed, rule, to_vlp, weight_and_bias
from vlp.convert.tokenizers import tokenizer_from_path
from vlp.models.owlvit import OwlVit, OwlVitConfig
from vlp.registry import FAMILIES
from vlp.towers import TextConfig, VisionConfig

MODEL_TYPES = ("owlvit", "owlv2")
ARCHITECTURES = {"owlvit": "OwlViTForObjectDetection", "owlv2": "Owlv2ForObjectDetection"}
# CLIP's towers, with OWL-ViT's 16 query positions and "!" (id 0) padding.
_TEXT_DEFAULTS = {**_DEFAULTS["clip"]["text_config"], "max_position_embeddings": 16, "pad_token_id": 0}
IGNORED_KEYS = ("position_ids", "visual_projection.weight", "logit_scale")


def config_from_hf(config: dict[str, Any]) -> OwlVitConfig:
    """An OwlViT / Owlv2 config.json -> vlp's OwlVitConfig."""
    model_type = config["model_type"]
    text = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    vision = {**_DEFAULTS["clip"]["vision_config"], "image_size": 960 if model_type == "owlv2" else 768,
              "patch_size": 16 if model_type == "owlv2" else 32, **(config.get("vision_config") or {})}
    projection = config.get("projection_dim", 512)
    if text["hidden_size"] != projection:
        raise ConversionError(f"text_config.hidden_size {text['hidden_size']} != projection_dim {projection}: the "
                              "class head's output would not meet the query embeddings")
    vision_cfg = VisionConfig(
        image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
        layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
        act=activation_from_hf(vision["hidden_act"], "vision_config"), norm_eps=vision["layer_norm_eps"],
    )
    text_cfg = TextConfig(
        vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"], width=text["hidden_size"],
        layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        mlp_ratio=text["intermediate_size"] / text["hidden_size"],
        act=activation_from_hf(text["hidden_act"], "text_config"), norm_eps=text["layer_norm_eps"], pool="argmax",
    )
    return OwlVitConfig(embed_dim=projection, vision=vision_cfg, text=text_cfg, merge_norm_eps=vision["layer_norm_eps"],
                        objectness=model_type == "owlv2")


def hf_rules(cfg: OwlVitConfig, model_type: str) -> list:
    vision = [
        rule("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
        rule("class_embedding", "embeddings.class_embedding"),
        *weight_and_bias("ln_pre", "pre_layernorm"),
        *_block_rules(cfg.vision.layers),
        *weight_and_bias("ln_post", "post_layernorm"),
    ]
    text = [
        rule("token_embedding.weight", "embeddings.token_embedding.weight"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
        *_block_rules(cfg.text.layers),
        *weight_and_bias("ln_final", "final_layer_norm"),
    ]
    top = f"{model_type}."
    rules = prefixed(vision, "visual.", f"{top}vision_model.") + prefixed(text, "text.", f"{top}text_model.")
    rules += [rule("text_projection.weight", f"{top}text_projection.weight"), *weight_and_bias("merge_norm", "layer_norm")]
    heads = [("class_head", ("dense0", "logit_shift", "logit_scale")), ("box_head", ("dense0", "dense1", "dense2"))]
    if cfg.objectness:
        heads.append(("objectness_head", ("dense0", "dense1", "dense2")))
    for head, layers in heads:
        rules += [r for layer in layers for r in weight_and_bias(f"{head}.{layer}", f"{head}.{layer}")]
    return rules


def image_config_of(folder: Path, cfg: OwlVitConfig, model_type: str) -> ImageConfig:
    """v1: squash to the input size (bicubic); v2: pad to a square, then the anti-aliased linear resize."""
    settings, path = hf_image_processor_settings(folder)
    size = settings.get("size", cfg.vision.image_size)
    size = int(size.get("height", cfg.vision.image_size)) if isinstance(size, dict) else int(size)
    mean, std = tuple(settings.get("image_mean", CLIP_MEAN)), tuple(settings.get("image_std", CLIP_STD))
    if model_type == "owlv2":
        return ImageConfig(size=size, mean=mean, std=std, resize_mode="pad", pad_value=0.0,
                           interpolation="antialiased_linear")
    if settings.get("do_center_crop"):
        raise ConversionError(f"{path}: do_center_crop cuts off parts of non-square images (transformers #18553); "
                              "set it to false")
    return ImageConfig(size=size, mean=mean, std=std, resize_mode="squash",
                       interpolation="bilinear" if settings.get("resample", 3) == 2 else "bicubic")


def load_hf_owlvit(folder: Path, *, tokenizer: str | Path | None = None, **_: Any) -> Pretrained:
    """An OwlViTForObjectDetection / Owlv2ForObjectDetection folder."""
    config = read_hf_config(folder)
    model_type = config["model_type"]
    cfg = config_from_hf(config)
    model = OwlVit(cfg)
    state, path = read_hf_weights(folder)
    model.load_state_dict(to_vlp(state, hf_rules(cfg, model_type), model.state_dict(), source=str(path),
                                 ignore=IGNORED_KEYS))
    model.eval()
    text_tokenizer = tokenizer_from_path(tokenizer or folder, context_length=cfg.text.context_length,
                                         model_type=model_type)
    return Pretrained(FAMILIES["owlvit"], cfg, model,
                      Assets({TEXT: text_tokenizer}, {IMAGE: image_config_of(folder, cfg, model_type)}), folder)


def _check_exportable(cfg: OwlVitConfig, tokenizer: Any) -> None:
    vision = cfg.vision
    if not isinstance(vision, VisionConfig) or not (vision.class_token and vision.ln_pre and not vision.patch_bias
                                                    and vision.pool == "cls" and not vision.stem_channels):
        raise ConversionError("Hugging Face OWL-ViT has a CLIP ViT image tower (patch projection without bias, "
                              "class token, pre-norm)")
    fixed = {"merge_class_token": "mul-ln", "box_bias": "both", "head_act": "gelu", "normalize": True}
    wrong = [f"{k}={getattr(cfg, k)} (needs {v})" for k, v in fixed.items() if getattr(cfg, k) != v]
    if cfg.merge_norm_eps != vision.norm_eps:
        wrong.append(f"merge_norm_eps={cfg.merge_norm_eps} (needs the vision eps {vision.norm_eps})")
    if cfg.text.width != cfg.embed_dim:
        wrong.append(f"text.width={cfg.text.width} (needs embed_dim {cfg.embed_dim})")
    if not cfg.text.causal:
        wrong.append("text.causal=False (needs a causal text tower)")
    end = tokenizer.framing_ids()[1]
    if cfg.text.pool not in ("argmax", "eot") or end != max(tokenizer.backend.get_vocab(with_added_tokens=True).values()):
        wrong.append("the text must pool at end-of-text, the largest token id (transformers pools at argmax)")
    if wrong:
        raise ConversionError("the model does not fit Hugging Face's OWL-ViT layout: " + ", ".join(wrong))


def export_hf_owlvit(pretrained: Pretrained, out: Path, architecture: str | None = None) -> Path:
    """Write a folder that `OwlViTForObjectDetection` (or `Owlv2ForObjectDetection`, for a model with an
    objectness head) and its processor load."""
    cfg: OwlVitConfig = pretrained.config
    _check_exportable(cfg, pretrained.tokenizer)
    model_type = "owlv2" if cfg.objectness else "owlvit"
    v, t = cfg.vision, cfg.text
    framing = pretrained.tokenizer.framing_ids()
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {**_hf_tower(t.width, t.layers, t.heads, t.mlp_ratio, t.act, t.norm_eps),
                        "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
                        "pad_token_id": pretrained.tokenizer.pad_id, "bos_token_id": framing[0],
                        "eos_token_id": framing[1], "model_type": f"{model_type}_text_model"},
        "vision_config": {**_hf_tower(v.width, v.layers, v.heads, v.mlp_ratio, v.act, v.norm_eps),
                          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
                          "model_type": f"{model_type}_vision_model"},
    }
    state = from_vlp(pretrained.model.state_dict(), hf_rules(cfg, model_type))
    state[f"{model_type}.logit_scale"] = torch.tensor(2.6592)
    image = pretrained.image_config
    processor = {
        "image_processor_type": "Owlv2ImageProcessor" if model_type == "owlv2" else "OwlViTImageProcessor",
        "do_resize": True, "size": {"height": image.size, "width": image.size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image.mean), "image_std": list(image.std),
        "resample": 2 if image.interpolation == "bilinear" else 3,
    }
    if model_type == "owlv2":
        processor["do_pad"] = True
    else:
        processor.update(do_center_crop=False, crop_size={"height": image.size, "width": image.size})
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    save_hf_tokenizer(pretrained.tokenizer, out)
    return out


__all__ = ["MODEL_TYPES", "config_from_hf", "export_hf_owlvit", "load_hf_owlvit"]
