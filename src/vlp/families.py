"""The model families vlp trains: each names its config, model, objective config and objective.

A static table, not a registry filled by import side effects: adding a family is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlp.config import ConfigError, from_dict
from vlp.data.nlvr import nlvr_batches, nlvr_texts
from vlp.data.pipeline import GoodBatches, train_batches, training_captions
from vlp.data.vqa import vqa_batches, vqa_texts
from vlp.models.blip import Blip, BlipConfig, BlipNlvr, BlipNlvrConfig, BlipVqa, BlipVqaConfig
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.models.coca import Coca, CocaConfig
from vlp.objectives.blip import (
    BlipObjective,
    BlipObjectiveConfig,
    NlvrObjective,
    NlvrObjectiveConfig,
    VqaObjective,
    VqaObjectiveConfig,
)
from vlp.objectives.coca import CocaObjective, CocaObjectiveConfig
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: Callable[[Any], nn.Module]
    objective_config_cls: type
    objective_cls: Callable[[Any, Any], Any]
    # The training data it reads: batches(data config, transform, tokenizer, batch_size=, seed=, start_step=,
    # rank=, world_size=, bad=, position=) -> GoodBatches, and the texts a new tokenizer is trained on.
    batches: Callable[..., GoodBatches] = train_batches
    texts: Callable[[Any], Iterator[str]] = training_captions


FAMILIES: dict[str, Family] = {
    "clip": Family("clip", DualEncoderConfig, DualEncoder, ContrastiveObjectiveConfig, ContrastiveObjective),
    "blip": Family("blip", BlipConfig, Blip, BlipObjectiveConfig, BlipObjective),
    "coca": Family("coca", CocaConfig, Coca, CocaObjectiveConfig, CocaObjective),
    "blip_vqa": Family("blip_vqa", BlipVqaConfig, BlipVqa, VqaObjectiveConfig, VqaObjective, vqa_batches, vqa_texts),
    "blip_nlvr": Family(
        "blip_nlvr", BlipNlvrConfig, BlipNlvr, NlvrObjectiveConfig, NlvrObjective, nlvr_batches, nlvr_texts
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"config key 'model.family': unknown family '{name}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def parse_model_config(data: dict[str, Any]) -> tuple[Family, Any]:
    """{'family': name, ...} -> (family, typed architecture config)."""
    data = dict(data)
    if "family" not in data:
        raise ConfigError("missing config key 'model.family'")
    family = get_family(data.pop("family"))
    return family, from_dict(family.config_cls, data, prefix="model")
