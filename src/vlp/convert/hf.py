"""Hugging Face `CLIPModel` and `SiglipModel` folders: config, weights, preprocessing and tokenizer.

Facts the mapping rests on (transformers 4.x/5.x):
- HF keeps q/k/v as three Linear layers; vlp fuses them into one `qkv_proj`.
- CLIP's pre-block norm is spelled `pre_layrnorm`; the SigLIP MAP head keeps `nn.MultiheadAttention`'s
  packed `in_proj_weight`, which is vlp's `q_proj` and `kv_proj` stacked.
- CLIP pools the text at the first `eos_token_id`, or at the largest id when the config's eos id is 2
  (configs written before transformers PR #24773); SigLIP pools the last position.
- `config.json` may omit fields left at their defaults, so the defaults below fill them in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import Tokenizer
from vlp.checkpoint import Pretrained, write_safetensors
from vlp.convert.common import (
    HF_RESAMPLE,
    TO_HF_ACTIVATION,
    ConversionError,
    activation_from_hf,
    image_config_from_hf,
    read_hf_config,
    read_hf_weights,
    save_hf_tokenizer,
)
from vlp.convert.keymap import Rule, from_vlp, layer_rules, prefixed, rule, to_vlp, weight_and_bias
from vlp.convert.tokenizers import tokenizer_from_path
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.registry import FAMILIES
from vlp.towers import TextConfig, VisionConfig

MODEL_TYPES = ("clip", "siglip")
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_DEFAULTS = {
    "clip": {
        "text_config": {
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 32,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "top": {"projection_dim": 512, "logit_scale_init_value": 2.6592},
    },
    "siglip": {
        "text_config": {
            "vocab_size": 32000,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 64,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "pad_token_id": 1,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "projection_size": None,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": True,
        },
        "top": {},
    },
}
IGNORED_KEYS = ("position_ids",)


def _tower(config: dict[str, Any], model_type: str, name: str) -> dict[str, Any]:
    return {**_DEFAULTS[model_type][name], **(config.get(name) or {})}


def _square(value: Any, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{where} {value} is not square; vlp's ViT takes square images")
        value = value[0]
    return int(value)


def config_from_hf(config: dict[str, Any]) -> DualEncoderConfig:
    """A CLIPModel / SiglipModel config.json -> vlp's DualEncoderConfig."""
    model_type = config["model_type"]
    text, vision = _tower(config, model_type, "text_config"), _tower(config, model_type, "vision_config")
    siglip = model_type == "siglip"
    vision_cfg = VisionConfig(
        image_size=_square(vision["image_size"], "vision_config.image_size"),
        patch_size=_square(vision["patch_size"], "vision_config.patch_size"),
        width=vision["hidden_size"],
        layers=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
        act=activation_from_hf(vision["hidden_act"], "vision_config"),
        norm_eps=vision["layer_norm_eps"],
        class_token=not siglip,
        patch_bias=siglip,
        ln_pre=not siglip,
        pool="map" if siglip else "cls",
    )
    if siglip and not vision["vision_use_head"]:
        raise ConversionError("vision_config.vision_use_head: false leaves SigLIP without an image embedding")
    if siglip:
        pool, eot_id = "last", None
    elif text["eos_token_id"] == 2:  # the legacy rule: end-of-text is the largest id
        pool, eot_id = "argmax", None
    else:
        pool, eot_id = "eot", text["eos_token_id"]
    text_cfg = TextConfig(
        vocab_size=text["vocab_size"],
        context_length=text["max_position_embeddings"],
        width=text["hidden_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        mlp_ratio=text["intermediate_size"] / text["hidden_size"],
        act=activation_from_hf(text["hidden_act"], "text_config"),
        norm_eps=text["layer_norm_eps"],
        causal=not siglip,
        pool=pool,
        eot_token_id=eot_id,
    )
    if siglip:
        return DualEncoderConfig(
            embed_dim=vision_cfg.width,
            vision=vision_cfg,
            text=text_cfg,
            init_logit_scale=math.log(10),
            init_logit_bias=-10.0,
            vision_projection=False,
            text_projection_bias=True,
        )
    top = {**_DEFAULTS["clip"]["top"], **config}
    return DualEncoderConfig(
        embed_dim=top["projection_dim"],
        vision=vision_cfg,
        text=text_cfg,
        init_logit_scale=top["logit_scale_init_value"],
    )


def _block_rules(layers: int) -> list[Rule]:
    """CLIP/SigLIP encoder layers (separate q, k, v) <-> TransformerBlocks."""
    return layer_rules(layers, "blocks", "encoder.layers", [
        ("norm1", "layer_norm1"), ("attn.qkv_proj", tuple(f"self_attn.{p}_proj" for p in "qkv")),
        ("attn.out_proj", "self_attn.out_proj"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
    ])  # fmt: skip


def hf_rules(cfg: DualEncoderConfig, model_type: str) -> list[Rule]:
    siglip = model_type == "siglip"
    vision = [
        rule("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
    ]
    if siglip:
        vision += [
            rule("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
            rule("pool.probe", "head.probe"),
            rule(("pool.attn.q_proj.weight", "pool.attn.kv_proj.weight"), "head.attention.in_proj_weight"),
            rule(("pool.attn.q_proj.bias", "pool.attn.kv_proj.bias"), "head.attention.in_proj_bias"),
            *weight_and_bias("pool.attn.out_proj", "head.attention.out_proj"),
            *weight_and_bias("pool.norm", "head.layernorm"),
            *weight_and_bias("pool.mlp.fc1", "head.mlp.fc1"),
            *weight_and_bias("pool.mlp.fc2", "head.mlp.fc2"),
        ]
    else:
        vision += [rule("class_embedding", "embeddings.class_embedding"), *weight_and_bias("ln_pre", "pre_layrnorm")]
    vision += [*_block_rules(cfg.vision.layers), *weight_and_bias("ln_post", "post_layernorm")]
    text = [
        rule("token_embedding.weight", "embeddings.token_embedding.weight"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
        *_block_rules(cfg.text.layers),
        *weight_and_bias("ln_final", "final_layer_norm"),
    ]
    rules = prefixed(vision, "visual.", "vision_model.") + prefixed(text, "text.", "text_model.")
    if siglip:
        rules += [
            *weight_and_bias("text_projection", "text_model.head"),
            rule("logit_scale", "logit_scale", "unsqueeze"),
            rule("logit_bias", "logit_bias", "unsqueeze"),
        ]
    else:
        rules += [
            rule("visual_projection.weight", "visual_projection.weight"),
            rule("text_projection.weight", "text_projection.weight"),
            rule("logit_scale", "logit_scale"),
        ]
    return rules


def image_config_of(folder: Path, image_size: int, model_type: str) -> ImageConfig:
    """CLIP's processor center-crops with CLIP's mean and std; SigLIP's squashes with 0.5."""
    if model_type == "siglip":
        return image_config_from_hf(folder, image_size, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    return image_config_from_hf(folder, image_size, crop=True)


def load_hf(folder: Path, *, tokenizer: str | Path | None = None, **_: Any) -> Pretrained:
    """A CLIPModel / SiglipModel folder."""
    config = read_hf_config(folder)
    model_type = config["model_type"]
    cfg = config_from_hf(config)
    model = DualEncoder(cfg)
    state, path = read_hf_weights(folder)
    model.load_state_dict(
        to_vlp(state, hf_rules(cfg, model_type), model.state_dict(), source=str(path), ignore=IGNORED_KEYS)
    )
    model.eval()
    text_tokenizer = tokenizer_from_path(
        tokenizer or folder, context_length=cfg.text.context_length, model_type=model_type
    )
    image_config = image_config_of(folder, cfg.vision.image_size, model_type)
    return Pretrained(FAMILIES["clip"], cfg, model, Assets({TEXT: text_tokenizer}, {IMAGE: image_config}), folder)


def model_type_of(cfg: DualEncoderConfig) -> str:
    """Which HF architecture a vlp dual encoder is, or a ConversionError saying what does not fit either."""
    vision = cfg.vision
    if not isinstance(vision, VisionConfig):
        raise ConversionError(f"the image tower is a {vision.kind}; only ViT towers have a Hugging Face equivalent")
    if vision.stem_channels:
        raise ConversionError("the ViT has a convolutional stem (vision.stem_channels); Hugging Face's have a "
                              "patch projection")
    clip_like = {
        "class_token": True,
        "patch_bias": False,
        "ln_pre": True,
        "pool": "cls",
        "vision_projection": True,
        "causal": True,
        "text_projection_bias": False,
        "logit_bias": False,
    }
    siglip_like = {
        "class_token": False,
        "patch_bias": True,
        "ln_pre": False,
        "pool": "map",
        "vision_projection": False,
        "causal": False,
        "text_projection_bias": True,
        "logit_bias": True,
    }
    actual = {
        "class_token": vision.class_token,
        "patch_bias": vision.patch_bias,
        "ln_pre": vision.ln_pre,
        "pool": vision.pool,
        "vision_projection": cfg.vision_projection,
        "causal": cfg.text.causal,
        "text_projection_bias": cfg.text_projection_bias,
        "logit_bias": cfg.init_logit_bias is not None,
    }
    for model_type, layout in (("clip", clip_like), ("siglip", siglip_like)):
        if actual == layout:
            return model_type
    closest = min((clip_like, siglip_like), key=lambda lay: sum(actual[k] != v for k, v in lay.items()))
    diffs = ", ".join(f"{k}={actual[k]} (needs {v})" for k, v in closest.items() if actual[k] != v)
    raise ConversionError(f"the model is neither a CLIPModel nor a SiglipModel layout: {diffs}")


def _hf_tower(width: int, layers: int, heads: int, mlp_ratio: float, act: str, eps: float) -> dict[str, Any]:
    hidden = round(width * mlp_ratio)
    if abs(hidden - width * mlp_ratio) > 1e-6:
        raise ConversionError(f"mlp_ratio {mlp_ratio} x width {width} is not a whole intermediate size")
    return {
        "hidden_size": width,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": TO_HF_ACTIVATION[act],
        "layer_norm_eps": eps,
    }


def hf_config_from_vlp(cfg: DualEncoderConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    model_type = model_type_of(cfg)
    v, t = cfg.vision, cfg.text
    vision = {
        **_hf_tower(v.width, v.layers, v.heads, v.mlp_ratio, v.act, v.norm_eps),
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "model_type": f"{model_type}_vision_model",
    }
    text = {
        **_hf_tower(t.width, t.layers, t.heads, t.mlp_ratio, t.act, t.norm_eps),
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.context_length,
        "pad_token_id": tokenizer.pad_id,
        "model_type": f"{model_type}_text_model",
    }
    config: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    if model_type == "siglip":
        if t.pool != "last":
            raise ConversionError(f"SigLIP pools the last text token; this model pools '{t.pool}'")
        text.update(projection_size=cfg.embed_dim, eos_token_id=tokenizer.framing_ids()[1])
        vision["vision_use_head"] = True
    else:
        if t.pool == "argmax":
            eos = 2  # transformers pools at the largest id exactly when the configured eos id is 2
        elif t.pool == "eot":
            eos = t.eot_token_id if t.eot_token_id is not None else tokenizer.framing_ids()[1]
            if eos == 2:
                raise ConversionError("end-of-text id 2 makes transformers pool at the largest id, not at end-of-text")
        else:
            raise ConversionError(f"CLIPModel pools the text at end-of-text; this model pools '{t.pool}'")
        text.update(eos_token_id=eos, projection_dim=cfg.embed_dim)
        vision["projection_dim"] = cfg.embed_dim
        config.update(projection_dim=cfg.embed_dim, logit_scale_init_value=cfg.init_logit_scale)
    config.update(text_config=text, vision_config=vision)
    return config


def _image_processor(image: ImageConfig, model_type: str) -> dict[str, Any]:
    resample = {v: k for k, v in HF_RESAMPLE.items()}[image.interpolation]
    settings: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": resample,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
        "image_processor_type": "SiglipImageProcessor" if model_type == "siglip" else "CLIPImageProcessor",
    }
    if image.resize_mode == "squash":
        settings.update(size={"height": image.size, "width": image.size}, do_center_crop=False)
    else:
        settings.update(
            size={"shortest_edge": image.size},
            do_center_crop=True,
            crop_size={"height": image.size, "width": image.size},
        )
    return settings


def export_hf(pretrained: Pretrained, out: Path, architecture: str | None = None) -> Path:
    """Write a folder that `transformers.CLIPModel` / `SiglipModel` and AutoTokenizer load (a dual encoder
    has one architecture: `architecture` is there for the exporters' common signature)."""
    cfg = pretrained.config
    if not isinstance(cfg, DualEncoderConfig):
        raise ConversionError(f"family '{pretrained.family.name}' has no Hugging Face export yet")
    config = hf_config_from_vlp(cfg, pretrained.tokenizer)
    model_type = config["model_type"]
    state = from_vlp(pretrained.model.state_dict(), hf_rules(cfg, model_type))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "preprocessor_config.json").write_text(
        json.dumps(_image_processor(pretrained.image_config, model_type), indent=1)
    )
    save_hf_tokenizer(pretrained.tokenizer, out)
    return out
