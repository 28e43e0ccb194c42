"""vlp dual encoders and CoCa models written as open_clip checkpoints: a folder with `open_clip_config.json`
({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`, as open_clip's `save_for_hf` writes it,
loadable by `open_clip.create_model("local-dir:...")` (the reading side is `vlp.convert.open_clip`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp.assets.tokenizer import Tokenizer
from vlp.checkpoint import Pretrained, write_safetensors
from vlp.convert.common import ConversionError, save_hf_tokenizer
from vlp.convert.keymap import from_vlp
from vlp.convert.open_clip import CONFIG_FILE, TIMM_SIGLIP, WEIGHTS_FILES, check_coca_dims, coca_rules, open_clip_rules
from vlp.models.clip import DualEncoderConfig
from vlp.models.coca import CocaConfig
from vlp.towers import TextConfig, VisionConfig


def _norm_kwargs(eps: float) -> dict[str, Any]:
    return {"norm_kwargs": {"eps": eps}} if eps != 1e-5 else {}


def _act_kwargs(act: str) -> dict[str, Any]:
    return {"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {}


def _timm_siglip_config(cfg: DualEncoderConfig) -> dict[str, Any]:
    """A MAP-pooled vlp ViT as the timm SigLIP tower open_clip builds, when it is one of timm's variants."""
    v = cfg.vision
    shape = (v.width, v.layers, v.heads, round(v.width * v.mlp_ratio))
    variant = next((name for name, dims in TIMM_SIGLIP.items() if dims == shape), None)
    layout = (v.class_token, v.patch_bias, v.ln_pre, v.act, v.norm_eps, cfg.vision_projection)
    if variant is None or layout != (False, True, False, "gelu", 1e-6, False):
        raise ConversionError(
            "a MAP-pooled image tower exports to open_clip only as timm's SigLIP ViT (base, large or so400m "
            "widths and depths, no class token, patch bias, no ln_pre, exact GELU, eps 1e-6, no projection)"
        )
    return {
        "image_size": v.image_size,
        "timm_model_name": f"vit_{variant}_patch{v.patch_size}_siglip_{v.image_size}",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    }


def _builtin_vision_config(v: VisionConfig) -> dict[str, Any]:
    return dict(
        image_size=v.image_size,
        patch_size=v.patch_size,
        width=v.width,
        layers=v.layers,
        head_width=v.width // v.heads,
        mlp_ratio=v.mlp_ratio,
        no_ln_pre=not v.ln_pre,
        pool_type="tok" if v.pool == "cls" else "avg",
        **_norm_kwargs(v.norm_eps),
        **_act_kwargs(v.act),
    )


def _text_config(t: TextConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    return dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
        pad_id=tokenizer.pad_id,
        **_norm_kwargs(t.norm_eps),
        **_act_kwargs(t.act),
    )


def _require_patch_vit(v: Any) -> None:
    if not isinstance(v, VisionConfig):
        raise ConversionError(f"the image tower is a {v.kind}; only ViT towers have an open_clip equivalent")
    if v.stem_channels:
        raise ConversionError("the ViT has a convolutional stem (vision.stem_channels); open_clip's have a "
                              "patch projection")


def open_clip_config_from_vlp(cfg: DualEncoderConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    _require_patch_vit(v)
    if v.pool == "map":
        vision = _timm_siglip_config(cfg)
    else:
        needs = {
            "vision.class_token": (v.class_token, True),
            "vision.patch_bias": (v.patch_bias, False),
            "vision_projection": (cfg.vision_projection, True),
        }
        wrong = [f"{k}={a} (needs {b})" for k, (a, b) in needs.items() if a != b]
        if v.act != t.act:
            wrong.append(f"vision.act={v.act} and text.act={t.act} (open_clip uses one activation)")
        if wrong:
            raise ConversionError("the model has no open_clip built-in layout: " + ", ".join(wrong))
        vision = _builtin_vision_config(v)
    pool = {"argmax": "argmax", "eot": "eos", "last": "last", "first": "first"}[t.pool]
    text = dict(
        **_text_config(t, tokenizer),
        no_causal_mask=not t.causal,
        pool_type=pool,
        proj_bias=cfg.text_projection_bias,
    )
    if t.pool == "eot":
        text["eos_id"] = t.eot_token_id if t.eot_token_id is not None else tokenizer.framing_ids()[1]
    if t.mask_padding and not t.causal:
        text["use_pad_mask"] = True
    config: dict[str, Any] = {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if v.pool == "map":
        config["custom_text"] = True  # open_clip's SigLIP configs keep the text tower under `text.`
    if t.act == "quick_gelu":
        config["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        config["init_logit_bias"] = cfg.init_logit_bias
    return config


def coca_config_to_open_clip(cfg: CocaConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """A vlp CoCa as open_clip builds it, when it has open_clip's layout."""
    v, t = cfg.vision, cfg.text
    _require_patch_vit(v)
    needs = {
        "pooler": (cfg.pooler, "shared"),
        # open_clip 3.3's configs cannot ask for the corrected mask: its towers always use the legacy one.
        "cls_mask": (cfg.cls_mask, "legacy"),
        "vision.class_token": (v.class_token, True),
        "vision.patch_bias": (v.patch_bias, False),
        "vision.ln_post": (v.ln_post, False),
        "text.mlp_ratio": (t.mlp_ratio, 4.0),
        "text.norm_eps": (t.norm_eps, 1e-5),
    }
    wrong = [f"{k}={a} (needs {b})" for k, (a, b) in needs.items() if a != b]
    if v.act != t.act or t.act == "gelu_tanh":
        wrong.append(f"vision.act={v.act} and text.act={t.act} (open_clip's CoCa uses one: gelu or quick_gelu)")
    if wrong:
        raise ConversionError("the model has no open_clip CoCa layout: " + ", ".join(wrong))
    check_coca_dims(cfg)
    vision = {
        **_builtin_vision_config(v),
        "pool_type": "tok",
        "attentional_pool": True,
        "attn_pooler_queries": cfg.caption_queries,
        "attn_pooler_heads": cfg.pooler_heads,
        "output_tokens": True,
    }
    text = {**_text_config(t, tokenizer), "embed_cls": True, "output_tokens": True}
    multimodal = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": cfg.multimodal_heads or t.heads,
        "layers": cfg.multimodal_layers,
    }
    config: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision,
        "text_cfg": text,
        "multimodal_cfg": multimodal,
        "custom_text": True,
    }
    if t.act == "quick_gelu":
        config["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        config["init_logit_bias"] = cfg.init_logit_bias
    return config


def export_open_clip(pretrained: Pretrained, out: Path, architecture: str | None = None) -> Path:
    """Write open_clip's `save_for_hf` layout: open_clip_config.json + open_clip_model.safetensors (+ tokenizer).
    open_clip has one architecture per model config: `architecture` is there for the exporters' common signature."""
    cfg, tokenizer = pretrained.config, pretrained.tokenizer
    if isinstance(cfg, DualEncoderConfig):
        model_cfg = open_clip_config_from_vlp(cfg, tokenizer)
        rules = open_clip_rules(cfg, custom_text=bool(model_cfg.get("custom_text")))
    elif isinstance(cfg, CocaConfig):
        model_cfg, rules = coca_config_to_open_clip(cfg, tokenizer), coca_rules(cfg)
    else:
        raise ConversionError(f"family '{pretrained.family.name}' has no open_clip export yet")
    out.mkdir(parents=True, exist_ok=True)
    # open_clip's own CLIP BPE needs no files; any other tokenizer travels as a Hugging Face tokenizer folder.
    if not _is_open_clip_bpe(tokenizer):
        save_hf_tokenizer(tokenizer, out)
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(out.resolve())
        clean = tokenizer.clean if tokenizer.clean in ("whitespace", "lower", "canonicalize") else "whitespace"
        model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": clean}
    state = from_vlp(pretrained.model.state_dict(), rules)
    write_safetensors(state, out / WEIGHTS_FILES[0], metadata={"format": "pt"})
    image = pretrained.image_config
    preprocess = {
        "size": image.size,
        "mean": list(image.mean),
        "std": list(image.std),
        "interpolation": image.interpolation,
        "resize_mode": image.resize_mode,
    }
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
    return out


def _is_open_clip_bpe(tokenizer: Tokenizer) -> bool:
    backend = tokenizer.backend
    return (
        tokenizer.clean == "lower"
        and backend.get_vocab_size() == 49408
        and backend.token_to_id("<start_of_text>") == 49406
        and backend.token_to_id("<end_of_text>") == 49407
    )
