"""open_clip checkpoints: a model config (`embed_dim`, `vision_cfg`, `text_cfg`) and a state dict.

Accepted forms: a folder with `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors` / `open_clip_pytorch_model.bin`, as open_clip's `save_for_hf` writes it;
or any state-dict file with the model config JSON given beside it (e.g. `ViT-B-32-quickgelu.json`).
Built-in ViT image towers, timm's SigLIP ViTs (`vit_{base,large,so400m}_patch*_siglip_*` with a MAP
head, as open_clip's `ViT-*-SigLIP` configs use) and the built-in text transformer are supported, and
CoCa (`coca_ViT-*`, a config with `multimodal_cfg`) as vlp's `coca` family; other timm and Hugging Face
towers, ResNets and LayerScale are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import CLIP_MEAN, CLIP_STD, ImageConfig
from vlp.checkpoint import CheckpointError, Pretrained
from vlp.convert.common import ConversionError
from vlp.convert.keymap import Rule, layer_rules, prefixed, read_state_dict, rule, to_vlp, weight_and_bias
from vlp.convert.tokenizers import open_clip_tokenizer
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.models.coca import Coca, CocaConfig
from vlp.registry import FAMILIES
from vlp.towers import TextConfig, VisionConfig

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# OpenAI's original state dicts carry these non-tensor-like extras; the causal mask is a buffer.
IGNORED_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")

# Options whose default is the only behaviour vlp implements: refuse a config that sets them otherwise.
_VISION_DEFAULTS = {
    "ls_init_value": None,
    "attentional_pool": False,
    "pos_embed_type": "learnable",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_TEXT_DEFAULTS = {
    "ls_init_value": None,
    "embed_cls": False,
    "final_ln_after_pool": False,
    "proj_type": "linear",
    "hf_model_name": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "tokenizer_mode": None,
}
_POOL = {"argmax": "argmax", "eos": "eot", "last": "last", "first": "first"}
# timm's SigLIP ViTs (big_vision's variant table): width, depth, heads, MLP width.
TIMM_SIGLIP = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096), "so400m": (1152, 27, 16, 4304)}
_TIMM_SIGLIP_NAME = re.compile(r"vit_(base|large|so400m)_patch(\d+)_siglip_(\d+)")


def is_open_clip_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _check_defaults(cfg: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    for key, default in defaults.items():
        if cfg.get(key, default) != default:
            raise ConversionError(f"open_clip {where}.{key} = {cfg[key]!r} is not supported by vlp (only {default!r})")


def _activation(model_cfg: dict[str, Any], tower: dict[str, Any], where: str) -> str:
    kwargs = tower.get("act_kwargs") or {}
    if kwargs.get("approximate") == "tanh":
        return "gelu_tanh"
    if set(kwargs) - {"approximate"}:
        raise ConversionError(f"open_clip {where}.act_kwargs {kwargs} is not supported")
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _eps(tower: dict[str, Any], where: str) -> float:
    kwargs = tower.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise ConversionError(f"open_clip {where}.norm_kwargs {kwargs} is not supported")
    return float(kwargs.get("eps", 1e-5))


def _timm_siglip_vision(vision: dict[str, Any]) -> VisionConfig:
    name = vision["timm_model_name"]
    match = _TIMM_SIGLIP_NAME.fullmatch(name)
    if match is None:
        raise ConversionError(
            f"open_clip vision_cfg.timm_model_name '{name}' is not supported; vlp reads timm's SigLIP ViTs "
            "(vit_base|large|so400m_patchN_siglip_RES)"
        )
    if vision.get("timm_pool", "avg") != "map" or vision.get("timm_proj", "linear") not in ("none", ""):
        raise ConversionError(f"open_clip timm tower '{name}' is supported with timm_pool: map and timm_proj: none")
    width, depth, heads, mlp = TIMM_SIGLIP[match.group(1)]
    return VisionConfig(
        image_size=vision.get("image_size", int(match.group(3))),
        patch_size=int(match.group(2)),
        width=width,
        layers=depth,
        heads=heads,
        mlp_ratio=mlp / width,
        act="gelu",
        norm_eps=1e-6,
        class_token=False,
        patch_bias=True,
        ln_pre=False,
        pool="map",
    )


def _builtin_vision(model_cfg: dict[str, Any], vision: dict[str, Any]) -> VisionConfig:
    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise ConversionError(f"open_clip vision_cfg.layers {layers} is a ModifiedResNet, which vlp does not build")
    pool_type = vision.get("pool_type", "tok")
    if pool_type not in ("tok", "avg"):
        raise ConversionError(f"open_clip vision_cfg.pool_type '{pool_type}' is not supported (tok or avg)")
    if vision.get("final_ln_after_pool") and pool_type == "avg":
        raise ConversionError("open_clip vision_cfg.final_ln_after_pool with avg pooling is not supported")
    width = vision.get("width", 768)
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConversionError(f"open_clip vision_cfg.image_size {image_size} is not square")
        image_size = image_size[0]
    return VisionConfig(
        image_size=image_size,
        patch_size=vision.get("patch_size", 16),
        width=width,
        layers=layers,
        heads=width // vision.get("head_width", 64),
        mlp_ratio=vision.get("mlp_ratio", 4.0),
        act=_activation(model_cfg, vision, "vision_cfg"),
        norm_eps=_eps(vision, "vision_cfg"),
        class_token=True,
        patch_bias=False,
        ln_pre=not vision.get("no_ln_pre", False),
        pool="cls" if pool_type == "tok" else "mean",
    )


def _builtin_text(model_cfg: dict[str, Any], text: dict[str, Any], **extra: Any) -> TextConfig:
    return TextConfig(
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("context_length", 77),
        width=text.get("width", 512),
        layers=text.get("layers", 12),
        heads=text.get("heads", 8),
        mlp_ratio=text.get("mlp_ratio", 4.0),
        act=_activation(model_cfg, text, "text_cfg"),
        norm_eps=_eps(text, "text_cfg"),
        **extra,
    )


def config_from_open_clip(model_cfg: dict[str, Any]) -> DualEncoderConfig:
    if "multimodal_cfg" in model_cfg:
        raise ConversionError(
            "open_clip CoCa configs (multimodal_cfg) are not dual encoders: see coca_config_from_open_clip"
        )
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    timm = vision.get("timm_model_name") is not None
    _check_defaults(vision, _VISION_DEFAULTS, "vision_cfg")
    _check_defaults(text, _TEXT_DEFAULTS, "text_cfg")
    vision_cfg = _timm_siglip_vision(vision) if timm else _builtin_vision(model_cfg, vision)
    pool = text.get("pool_type", "argmax")
    if pool not in _POOL:
        raise ConversionError(f"open_clip text_cfg.pool_type '{pool}' is not supported ({', '.join(_POOL)})")
    causal = not text.get("no_causal_mask", False)
    text_cfg = _builtin_text(
        model_cfg,
        text,
        causal=causal,
        mask_padding=bool(text.get("use_pad_mask")) and not causal,
        pool=_POOL[pool],
        eot_token_id=text.get("eos_id", 2) if pool == "eos" else None,
    )
    bias = model_cfg.get("init_logit_bias")
    return DualEncoderConfig(
        embed_dim=model_cfg["embed_dim"],
        vision=vision_cfg,
        text=text_cfg,
        init_logit_scale=math.log(1 / 0.07),
        init_logit_bias=float(bias) if bias is not None else None,
        vision_projection=not timm,
        text_projection_bias=bool(text.get("proj_bias", False)),
    )


def _block_rules(
    layers: int, ours_prefix: str = "blocks", theirs_prefix: str = "transformer.resblocks", cross: bool = False
) -> list[Rule]:
    """open_clip's residual attention blocks (packed q/k/v, `c_fc`/`c_proj` MLP) <-> TransformerBlocks,
    or with `cross` its cross-attention blocks (`ln_1_kv` on the context) <-> CrossAttentionBlocks."""
    pairs: list[tuple[str | tuple[str, ...], str]] = [
        ("norm1", "ln_1"), ("attn.out_proj", "attn.out_proj"), ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]  # fmt: skip
    if cross:
        pairs += [("norm_context", "ln_1_kv"), (("attn.q_proj", "attn.kv_proj"), "attn.in_proj_{p}")]
    else:
        pairs.append(("attn.qkv_proj", "attn.in_proj_{p}"))
    return layer_rules(layers, ours_prefix, theirs_prefix, pairs)


def _timm_vision_rules(layers: int) -> list[Rule]:
    rules = [
        *weight_and_bias("patch_embed.proj", "patch_embed.proj"),
        rule("pos_embed", "pos_embed", "unsqueeze"),
        *weight_and_bias("ln_post", "norm"),
        rule("pool.probe", "attn_pool.latent"),
        *weight_and_bias("pool.attn.q_proj", "attn_pool.q"),
        *weight_and_bias("pool.attn.kv_proj", "attn_pool.kv"),
        *weight_and_bias("pool.attn.out_proj", "attn_pool.proj"),
        *weight_and_bias("pool.norm", "attn_pool.norm"),
        *weight_and_bias("pool.mlp.fc1", "attn_pool.mlp.fc1"),
        *weight_and_bias("pool.mlp.fc2", "attn_pool.mlp.fc2"),
    ]
    rules += layer_rules(layers, "blocks", "blocks", [
        ("norm1", "norm1"), ("attn.qkv_proj", "attn.qkv"), ("attn.out_proj", "attn.proj"), ("norm2", "norm2"),
        ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
    ])  # fmt: skip
    return prefixed(rules, "", "trunk.")


def _builtin_vision_rules(vision: VisionConfig) -> list[Rule]:
    """open_clip's built-in ViT up to its last block (ln_post is the model's to place)."""
    rules = [
        rule("patch_embed.proj.weight", "conv1.weight"),
        rule("class_embedding", "class_embedding"),
        rule("pos_embed", "positional_embedding"),
        *_block_rules(vision.layers),
    ]
    return rules + (weight_and_bias("ln_pre", "ln_pre") if vision.ln_pre else [])


def _text_rules(text: TextConfig) -> list[Rule]:
    return [
        rule("token_embedding.weight", "token_embedding.weight"),
        rule("pos_embed", "positional_embedding"),
        *_block_rules(text.layers),
        *weight_and_bias("ln_final", "ln_final"),
    ]


def open_clip_rules(cfg: DualEncoderConfig, custom_text: bool) -> list[Rule]:
    if cfg.vision.pool == "map":  # timm's SigLIP tower; no projection after it
        vision = _timm_vision_rules(cfg.vision.layers)
    else:
        vision = [*_builtin_vision_rules(cfg.vision), *weight_and_bias("ln_post", "ln_post")]
    text = _text_rules(cfg.text)
    text_prefix = "text." if custom_text else ""
    rules = prefixed(vision, "visual.", "visual.") + prefixed(text, "text.", text_prefix)
    if cfg.vision_projection:
        rules.append(rule("visual_projection.weight", "visual.proj", "transpose"))
    if cfg.text_projection_bias:  # an nn.Linear in open_clip, laid out as vlp's
        rules += weight_and_bias("text_projection", text_prefix + "text_projection")
    else:  # a [width, embed] matrix used as x @ proj
        rules.append(rule("text_projection.weight", text_prefix + "text_projection", "transpose"))
    rules.append(rule("logit_scale", "logit_scale"))
    if cfg.init_logit_bias is not None:
        rules.append(rule("logit_bias", "logit_bias"))
    return rules


def check_coca_dims(cfg: CocaConfig) -> None:
    """open_clip's CoCa decoder reads the text states and the pooled image tokens at one width."""
    if not cfg.text.width == cfg.embed_dim:
        raise ConversionError(
            f"open_clip's CoCa needs text.width ({cfg.text.width}) == embed_dim ({cfg.embed_dim}): its "
            "multimodal decoder reads text states and image tokens at one width"
        )


def coca_config_from_open_clip(model_cfg: dict[str, Any]) -> CocaConfig:
    """open_clip's CoCa (`coca_ViT-*`): one 256-query attentional pooler whose query 0 is the contrastive
    embedding, the legacy CLS mask of its released weights. Start and end ids are CLIP BPE's until the
    tokenizer is known."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    multimodal = model_cfg["multimodal_cfg"]
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ConversionError("open_clip CoCa with a timm or Hugging Face tower is not supported")
    if vision.get("attentional_pool") is not True:
        raise ConversionError(
            f"open_clip CoCa vision_cfg.attentional_pool = {vision.get('attentional_pool')!r}: vlp reads the "
            "single attentional pooler (true); the 'parallel' and 'cascade' variants are open_clip's unreleased WIP"
        )
    _check_defaults(vision, {**_VISION_DEFAULTS, "attentional_pool": True, "pool_type": "tok"}, "vision_cfg")
    _check_defaults(
        text,
        {
            **_TEXT_DEFAULTS,
            "embed_cls": True,
            "no_causal_mask": False,
            "proj_bias": False,
            "norm_kwargs": None,
            "act_kwargs": None,
        },
        "text_cfg",
    )
    _check_defaults(multimodal, {"ls_init_value": None}, "multimodal_cfg")
    # The decoder is built with MLP ratio 4 and the default LayerNorm whatever its config says; vlp's
    # multimodal half shares the text's.
    if text.get("mlp_ratio", 4.0) != 4.0:
        raise ConversionError("open_clip CoCa text_cfg.mlp_ratio must be 4 (its decoder's fixed ratio)")
    cfg = CocaConfig(
        embed_dim=model_cfg["embed_dim"],
        vision=replace(_builtin_vision(model_cfg, vision), ln_post=False),
        text=_builtin_text(model_cfg, text),
        multimodal_layers=multimodal.get("layers", 12),
        multimodal_heads=multimodal.get("heads", 8),
        pooler="shared",
        caption_queries=vision.get("attn_pooler_queries", 256),
        pooler_heads=vision.get("attn_pooler_heads", 8),
        cls_mask="legacy",
        init_logit_bias=model_cfg.get("init_logit_bias"),
        pad_token_id=text.get("pad_id", 0),
    )
    check_coca_dims(cfg)
    if multimodal.get("width", 512) != cfg.text.width:
        raise ConversionError(f"open_clip CoCa multimodal_cfg.width {multimodal.get('width', 512)} != text_cfg.width")
    return cfg


def coca_rules(cfg: CocaConfig) -> list[Rule]:
    if not isinstance(cfg.vision, VisionConfig) or cfg.pooler != "shared":
        raise ConversionError("open_clip's CoCa layout needs a ViT image tower and pooler: shared")
    pool = "visual.attn_pool.attn."
    if cfg.vision.width == cfg.embed_dim:  # torch's MultiheadAttention packs q/k/v when the widths agree
        pool_qkv = [rule(("pooler.attn.q_proj.weight", "pooler.attn.kv_proj.weight"), pool + "in_proj_weight")]
    else:
        pool_qkv = [
            rule("pooler.attn.q_proj.weight", pool + "q_proj_weight"),
            rule("pooler.attn.kv_proj.weight", (pool + "k_proj_weight", pool + "v_proj_weight")),
        ]
    rules = [
        *prefixed(_builtin_vision_rules(cfg.vision), "visual.", "visual."),
        rule("pooler.query", "visual.attn_pool.query"),
        *weight_and_bias("pooler.norm_query", "visual.attn_pool.ln_q"),
        *weight_and_bias("pooler.norm_context", "visual.attn_pool.ln_k"),
        *pool_qkv,
        rule(("pooler.attn.q_proj.bias", "pooler.attn.kv_proj.bias"), pool + "in_proj_bias"),
        *weight_and_bias("pooler.attn.out_proj", pool + "out_proj"),
        *weight_and_bias("ln_post", "visual.ln_post"),
        rule("image_projection.weight", "visual.proj", "transpose"),
        *prefixed(_text_rules(cfg.text), "text.", "text."),
        rule("text.cls_embedding", "text.cls_emb"),
        rule("text_projection.weight", "text.text_projection", "transpose"),
        *_block_rules(cfg.multimodal_layers, "decoder.self_blocks", "text_decoder.resblocks"),
        *_block_rules(cfg.multimodal_layers, "decoder.cross_blocks", "text_decoder.cross_attn", cross=True),
        *weight_and_bias("decoder.ln_final", "text_decoder.ln_final"),
        rule("decoder.lm_head.weight", "text_decoder.text_projection", "transpose"),
        rule("logit_scale", "logit_scale"),
    ]
    if cfg.init_logit_bias is not None:
        rules.append(rule("logit_bias", "logit_bias"))
    return rules


def _read_model_cfg(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads(path.read_text())
    if "model_cfg" in data:
        return data["model_cfg"], data.get("preprocess_cfg", {})
    if "embed_dim" not in data:
        raise CheckpointError(f"{path} is not an open_clip model config (no embed_dim or model_cfg)")
    return data, data.get("preprocess_cfg", {})


def image_config_from_open_clip(preprocess: dict[str, Any], image_size: int) -> ImageConfig:
    mode = preprocess.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ConversionError(f"open_clip resize_mode '{mode}' is not supported (shortest or squash)")
    interpolation = preprocess.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        raise ConversionError(f"open_clip interpolation '{interpolation}' is not supported (bicubic or bilinear)")
    size = preprocess.get("size", image_size)
    return ImageConfig(
        size=size[0] if isinstance(size, (list, tuple)) else size,
        mean=tuple(preprocess.get("mean", CLIP_MEAN)),
        std=tuple(preprocess.get("std", CLIP_STD)),
        interpolation=interpolation,
        resize_mode=mode,
    )


def _locate(path: Path, config: str | Path | None) -> tuple[Path, Path, Path]:
    """(folder, model config file, weights file) of an open_clip folder or a state-dict file."""
    if path.is_dir():
        weights = next((path / n for n in WEIGHTS_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds {CONFIG_FILE} but none of {', '.join(WEIGHTS_FILES)}")
        return path, Path(config) if config else path / CONFIG_FILE, weights
    if config is None:
        raise CheckpointError(
            f"{path} is a bare state dict: give its open_clip model config JSON too (--config ViT-B-32.json)"
        )
    return path.parent, Path(config), path


def model_kind(path: Path, config: str | Path | None = None) -> str:
    """Which vlp family an open_clip checkpoint is: coca (it has a multimodal decoder) or clip."""
    model_cfg, _ = _read_model_cfg(_locate(path, config)[1])
    return "coca" if "multimodal_cfg" in model_cfg else "clip"


def load_open_clip(path: Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None) -> Pretrained:
    """An open_clip folder, or a state-dict file with `config` (a model config JSON)."""
    folder, config_path, weights = _locate(path, config)
    model_cfg, preprocess = _read_model_cfg(config_path)
    if "multimodal_cfg" in model_cfg:
        cfg, family = coca_config_from_open_clip(model_cfg), FAMILIES["coca"]
    else:
        cfg, family = config_from_open_clip(model_cfg), FAMILIES["clip"]
    state = read_state_dict(weights)
    text_tokenizer = open_clip_tokenizer(model_cfg, folder, tokenizer)
    if isinstance(cfg, CocaConfig):
        # Generation starts from the tokenizer's start token and stops at its end token.
        bos, eos = text_tokenizer.framing_ids()
        cfg = replace(cfg, bos_token_id=bos, eos_token_id=eos)
        model, rules = Coca(cfg), coca_rules(cfg)
    else:
        model, rules = DualEncoder(cfg), open_clip_rules(cfg, custom_text=bool(model_cfg.get("custom_text")))
    model.load_state_dict(to_vlp(state, rules, model.state_dict(), source=str(weights), ignore=IGNORED_KEYS))
    model.eval()
    image_config = image_config_from_open_clip(preprocess, cfg.vision.image_size)
    return Pretrained(family, cfg, model, Assets({TEXT: text_tokenizer}, {IMAGE: image_config}), path)
