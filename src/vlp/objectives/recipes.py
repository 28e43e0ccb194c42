"""How each registered family trains: its objective (config and class), its data task and the assets a run
keeps beyond the `text` tokenizer.

The architecture side (config, model, abilities, presets) is `vlp.registry`; this table is the training
side, kept here so that loading a model never imports an objective or the data pipeline. The trainer
reads a family's recipe and knows no family by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlp.assets import INSTRUCTION
from vlp.assets.tokenizer import Tokenizer
from vlp.config import ConfigError, from_dict
from vlp.data.detection import BOXES
from vlp.data.instruction_batches import INSTRUCTION_RECORDS
from vlp.data.nlvr import IMAGE_PAIR_STATEMENTS
from vlp.data.pipeline import IMAGE_TEXT_PAIRS, DataConfig, TrainingData
from vlp.data.vqa import VQA_ANSWERS
from vlp.objectives.blip import (
    BlipObjective,
    BlipObjectiveConfig,
    NlvrObjective,
    NlvrObjectiveConfig,
    VqaObjective,
    VqaObjectiveConfig,
)
from vlp.objectives.blip2 import (
    Blip2Objective,
    Blip2ObjectiveConfig,
    Blip2QformerObjective,
    Blip2QformerObjectiveConfig,
)
from vlp.objectives.coca import CocaObjective, CocaObjectiveConfig
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig
from vlp.objectives.instructblip import InstructBlipObjective, InstructBlipObjectiveConfig, instruction_tokenizer
from vlp.objectives.owlvit import OwlVitObjective, OwlVitObjectiveConfig
from vlp.registry import Family


@dataclass(frozen=True)
class TokenizerAsset:
    """A tokenizer a run keeps beside `text` (`vlp.assets`): taken from the checkpoint a run resumes or starts
    from when it has one, else made by `build(model config)` (from the model's pre-trained sources); the
    text side of config section `model.<section>` must read what it writes."""

    name: str
    section: str
    build: Callable[[Any], Tokenizer]


@dataclass(frozen=True)
class Recipe:
    objective_config_cls: type
    objective_cls: Callable[[Any, Any], Any]
    # The training data it reads (the kinds of `vlp.data`, which the tasks read too).
    data: TrainingData = IMAGE_TEXT_PAIRS
    # Other families whose checkpoints `train.init_from` may start it from, through the model's
    # `init_from(pretrained model) -> tensors left at initialisation` (BLIP-VQA and BLIP-NLVR from BLIP).
    starts_from: tuple[str, ...] = ()
    # Tokenizers beyond `text`; `batches` gets each as `<name>_tokenizer`.
    tokenizers: tuple[TokenizerAsset, ...] = ()


RECIPES: dict[str, Recipe] = {
    "clip": Recipe(ContrastiveObjectiveConfig, ContrastiveObjective),
    "blip": Recipe(BlipObjectiveConfig, BlipObjective),
    "coca": Recipe(CocaObjectiveConfig, CocaObjective),
    "blip_vqa": Recipe(VqaObjectiveConfig, VqaObjective, VQA_ANSWERS, starts_from=("blip",)),
    "blip_nlvr": Recipe(NlvrObjectiveConfig, NlvrObjective, IMAGE_PAIR_STATEMENTS, starts_from=("blip",)),
    "blip2_qformer": Recipe(Blip2QformerObjectiveConfig, Blip2QformerObjective,
                            starts_from=("clip", "blip", "coca")),
    "blip2": Recipe(Blip2ObjectiveConfig, Blip2Objective, starts_from=("blip2_qformer", "clip", "blip", "coca")),
    "instructblip": Recipe(InstructBlipObjectiveConfig, InstructBlipObjective, INSTRUCTION_RECORDS,
                           starts_from=("blip2", "blip2_qformer"),
                           tokenizers=(TokenizerAsset(INSTRUCTION, "qformer", instruction_tokenizer),)),
    "owlvit": Recipe(OwlVitObjectiveConfig, OwlVitObjective, BOXES, starts_from=("clip",)),
}


def recipe_of(family: Family) -> Recipe:
    """A registered family without a recipe loads and predicts, but does not train."""
    if family.name not in RECIPES:
        raise ConfigError(f"config key 'model.family': vlp cannot train {family.name} models yet")
    return RECIPES[family.name]


def parse_objective_config(family: Family, data: dict[str, Any]) -> Any:
    return from_dict(recipe_of(family).objective_config_cls, data, prefix="objective")


def parse_data_config(family: Family, data: Any) -> DataConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'data': expected a mapping, got {data!r}")
    return from_dict(recipe_of(family).data.config, data, prefix="data")
