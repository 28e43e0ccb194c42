"""The model families vlp builds: family name -> architecture config, model class and abilities; and the
presets, architecture configs kept as JSON files in `vlp/presets/` (like open_clip's model configs).

A static table, not a registry filled by import side effects: a new family is one entry here. What
trains a family (its objective and data task) lives in `vlp.objectives.recipes`, so loading a model imports
no trainer, objective or data pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlp.abilities import (
    Ability,
    AnswersQuestions,
    CaptionsImages,
    DetectsBoxes,
    EmbedsImages,
    EmbedsTexts,
    FollowsInstructions,
    GivesImageTokens,
    JudgesImagePairs,
    MatchesImageText,
)
from vlp.assets import INSTRUCTION, TEXT
from vlp.config import ConfigError, from_dict, merge
from vlp.models.blip import Blip, BlipConfig, BlipNlvr, BlipNlvrConfig, BlipVqa, BlipVqaConfig
from vlp.models.blip2 import Blip2, Blip2Config, Blip2Qformer, Blip2QformerConfig
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.models.coca import Coca, CocaConfig
from vlp.models.instructblip import InstructBlip, InstructBlipConfig
from vlp.models.owlvit import OwlVit, OwlVitConfig

PRESETS_DIR = Path(__file__).parent / "presets"
# Architecture keys renamed since checkpoints were first written: (section, old) -> new. Older model.json
# files and saved run configs are read with the new name, and the log says so.
RENAMED_KEYS = {("text", "max_positions"): "context_length"}

log = logging.getLogger("vlp")


@dataclass(frozen=True)
class Family:
    """An architecture: its typed config, the model built from it, and what a loaded model can do."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    abilities: tuple[type[Ability], ...]
    # The named tokenizers (`vlp.assets`) its models read text with, and what each is, for the error a
    # checkpoint without one gets.
    tokenizers: tuple[tuple[str, str], ...] = ((TEXT, "tokenizer"),)

    def can(self, ability: type[Ability]) -> bool:
        return ability in self.abilities


FAMILIES: dict[str, Family] = {
    "clip": Family("clip", DualEncoderConfig, DualEncoder, (EmbedsImages, EmbedsTexts, GivesImageTokens)),
    "blip": Family(
        "blip", BlipConfig, Blip, (EmbedsImages, EmbedsTexts, GivesImageTokens, CaptionsImages, MatchesImageText)
    ),
    "coca": Family("coca", CocaConfig, Coca, (EmbedsImages, EmbedsTexts, GivesImageTokens, CaptionsImages)),
    "blip_vqa": Family("blip_vqa", BlipVqaConfig, BlipVqa, (AnswersQuestions,)),
    "blip_nlvr": Family("blip_nlvr", BlipNlvrConfig, BlipNlvr, (JudgesImagePairs,)),
    # Image embeddings are one vector per query: [B, Q, E].
    "blip2_qformer": Family(
        "blip2_qformer", Blip2QformerConfig, Blip2Qformer,
        (EmbedsImages, EmbedsTexts, GivesImageTokens, CaptionsImages, MatchesImageText),
    ),
    "blip2": Family("blip2", Blip2Config, Blip2, (CaptionsImages, AnswersQuestions)),
    "instructblip": Family("instructblip", InstructBlipConfig, InstructBlip, (AnswersQuestions, FollowsInstructions),
                           tokenizers=((TEXT, "language model's tokenizer"), (INSTRUCTION, "Q-Former's tokenizer"))),
    "owlvit": Family("owlvit", OwlVitConfig, OwlVit, (DetectsBoxes,)),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"config key 'model.family': unknown family '{name}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def list_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def read_preset(name: str) -> dict[str, Any]:
    """A preset's architecture as a mapping: {'family': ..., config keys ...}."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"config key 'model.preset': unknown preset '{name}'; known: {', '.join(list_presets())}")
    return json.loads(path.read_text())


def _overlay(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged over `base`, except that a section naming another `kind` (a ConvNet image tower
    over a preset's ViT) replaces the preset's section instead of mixing their keys."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def resolve_preset(data: dict[str, Any]) -> dict[str, Any]:
    """A model section with `preset: name` -> the preset's architecture with the section's other keys over it."""
    if "preset" not in data:
        return dict(data)
    data = dict(data)
    name = data.pop("preset")
    return _overlay(read_preset(name), data)


def _rename_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    for (section, old), new in RENAMED_KEYS.items():
        values = data.get(section)
        if isinstance(values, dict) and old in values and new not in values:
            log.warning("config key 'model.%s.%s' is now 'model.%s.%s'; read as such", section, old, section, new)
            data[section] = {new if key == old else key: value for key, value in values.items()}
    return data


def parse_model_config(data: dict[str, Any]) -> tuple[Family, Any]:
    """{'family': name, ...} or {'preset': name, ...} -> (family, typed architecture config)."""
    data = resolve_preset(_rename_old_keys(data))
    if "family" not in data:
        raise ConfigError("missing config key 'model.family' (or 'model.preset')")
    family = get_family(data.pop("family"))
    return family, from_dict(family.config_cls, data, prefix="model")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A randomly initialised model of a preset, top-level keys replaced (`embed_dim=64`)."""
    family, config = parse_model_config({"preset": name, **overrides})
    return family.model_cls(config)
