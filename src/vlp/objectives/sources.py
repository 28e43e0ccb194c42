"""Pre-trained parts a new run starts from, named in the model config's `sources` (BLIP-2's frozen image
tower and language model). `resolve_sources` copies their architecture into the config, before the model
is built (also when a run resumes); `load_sources` copies their weights in, once, when a run starts fresh.
The checkpoints it writes then hold everything: loading one never reads the sources again."""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import ConfigError

log = logging.getLogger("vlp.train")


@lru_cache(maxsize=2)
def _pretrained(path: str, key: str = "image_encoder") -> Any:
    from vlp.checkpoint import CheckpointError
    from vlp.convert import load_pretrained

    try:
        return load_pretrained(path)
    except CheckpointError as err:  # ConversionError is a ValueError: its message already names the file
        raise ConfigError(f"config key 'model.sources.{key}': {err}") from err


def _is_vlp(path: str) -> bool:
    from vlp.checkpoint import is_checkpoint_folder, list_checkpoints

    return is_checkpoint_folder(path) or bool(list_checkpoints(path))


def stage1_qformer(path: str) -> Any:
    """A vlp BLIP-2 stage-1 checkpoint named as `sources.qformer` (its Q-Former, text side and tokenizer)."""
    pretrained = _pretrained(path, "qformer")
    if pretrained.family.name != "blip2_qformer":
        raise ConfigError(f"config key 'model.sources.qformer': {path} is a checkpoint of family {pretrained.family.name}; a "
                          "Q-Former starts from a BLIP-2 stage-1 checkpoint (blip2_qformer) or a BERT folder")
    return pretrained


def _read_lm_config(folder: str) -> dict[str, Any]:
    """The config of a Hugging Face language model folder, checked: a causal (or encoder-decoder) LM that
    transformers builds from its own code. A folder that names code of its own (`auto_map`) is refused:
    vlp never runs code from a model folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    where = "config key 'model.sources.language_model'"
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{where}: {folder} holds no config.json (a Hugging Face causal LM folder; `vlp lm "
                          "convert-gguf` makes one from a GGUF file)")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path} does not hold a JSON object")
    if "auto_map" in data:
        raise ConfigError(f"{where}: {path} names code of its own (auto_map); vlp never runs code from a model folder")
    model_type = data.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: {folder} holds a {model_type!r} model, not a language model transformers "
                          "generates text with (e.g. llama, opt, t5)")
    return AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()


def resolve_sources(model_cfg: Any) -> Any:
    """The config with each source's architecture in place of the preset's (a config without sources is
    returned as it is)."""
    sources = getattr(model_cfg, "sources", None)
    if sources is None:
        return model_cfg
    if sources.image_encoder is not None:
        vision = getattr(_pretrained(sources.image_encoder).config, "vision", None)
        if vision is None:
            raise ConfigError(f"config key 'model.sources.image_encoder': {sources.image_encoder} has no image tower")
        try:
            model_cfg.image = dataclasses.replace(model_cfg.image, vision=vision)
        except ValueError as err:
            raise ConfigError(f"config key 'model.sources.image_encoder': {err}") from err
    if sources.qformer is not None and _is_vlp(sources.qformer):
        text_input = model_cfg.qformer.text_input
        model_cfg.qformer = dataclasses.replace(stage1_qformer(sources.qformer).config.qformer, text_input=text_input)
    elif sources.qformer is not None:
        from vlp.convert.hf_bert import qformer_config_from_bert

        model_cfg.qformer = qformer_config_from_bert(sources.qformer, model_cfg.qformer)
    if sources.language_model is not None:
        if "language_model" not in {f.name for f in dataclasses.fields(model_cfg)}:
            raise ConfigError("config key 'model.sources.language_model': this model has no language model "
                              "(BLIP-2's stage 1 is family blip2_qformer; stage 2 is family blip2)")
        model_cfg.language_model = _read_lm_config(sources.language_model)
    return model_cfg


def load_sources(model: nn.Module, model_cfg: Any) -> None:
    """Copy each source's weights into a freshly built model."""
    sources = getattr(model_cfg, "sources", None)
    if sources is None:
        return
    if sources.image_encoder is not None:
        from vlp.towers.frozen_image import load_image_tower

        load_image_tower(model.image_encoder, _pretrained(sources.image_encoder).model)
        log.info("image tower from %s (frozen)", sources.image_encoder)
    if sources.qformer is not None and _is_vlp(sources.qformer):
        state = stage1_qformer(sources.qformer).model.qformer.state_dict()
        model.qformer.load_state_dict({k: v for k, v in state.items() if k in model.qformer.state_dict()})
        log.info("Q-Former from the stage-1 checkpoint %s", sources.qformer)
    elif sources.qformer is not None:
        from vlp.convert.hf_bert import load_bert_into_qformer

        load_bert_into_qformer(model.qformer, sources.qformer)
        log.info("Q-Former from the BERT checkpoint %s (cross-attention and queries new)", sources.qformer)
    if sources.language_model is not None:
        from transformers import AutoConfig

        from vlp.models.blip2 import freeze_language_model, language_model_class

        lm_config = AutoConfig.for_model(**_read_lm_config(sources.language_model))
        lm = language_model_class(lm_config).from_pretrained(sources.language_model, trust_remote_code=False)
        model.language_model = freeze_language_model(lm, model_cfg.lm_precision)
        log.info("language model from %s (frozen)", sources.language_model)
    _pretrained.cache_clear()  # the weights are copied: the loaded source models are not kept
