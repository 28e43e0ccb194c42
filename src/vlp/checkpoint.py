"""vlp checkpoint folders: weights, architecture, preprocessing, tokenizer, and run state.

    model.safetensors   weights
    model.json          {"family": ..., architecture config}
    preprocess.json     image preprocessing (ImageConfig)
    tokenizer.json      the tokenizer, fixed to its context length
    state.json          step and run config (training checkpoints only)
    optimizer.pt        optimizer and schedule state (training checkpoints only; loaded weights_only)

Folders are written under a temporary name and renamed into place, so a killed run never leaves a
half-written checkpoint where `--resume latest` would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlp.config import from_dict, to_dict
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import ImageConfig, ImageTransform
from vlp.families import Family, parse_model_config

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "model.json"
PREPROCESS_FILE = "preprocess.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is missing, incomplete or does not fit the model; the message says which."""


@dataclass
class Pretrained:
    """A loaded model with the preprocessing and tokenizer it was trained with."""

    family: Family
    config: Any
    model: nn.Module
    image_config: ImageConfig
    tokenizer: Tokenizer
    path: Path

    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.image_config, train=False)


def save_checkpoint(
    folder: str | Path,
    *,
    family: Family,
    model_config: Any,
    model: nn.Module | dict[str, torch.Tensor],
    image_config: ImageConfig,
    tokenizer: Tokenizer,
    state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `model` is the module, or its state dict when it was gathered
    from shards."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "family": family.name})
    (tmp / ARCH_FILE).write_text(json.dumps({"family": family.name, **to_dict(model_config)}, indent=1))
    (tmp / PREPROCESS_FILE).write_text(json.dumps(to_dict(image_config), indent=1))
    tokenizer.save(tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / WEIGHTS_FILE).is_file() and (p / ARCH_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} holds no vlp checkpoint ({WEIGHTS_FILE} + {ARCH_FILE}, or {CHECKPOINTS_DIR}/step_*)")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights, naming any missing, unexpected or mis-shaped key."""
    weights = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(weights)


def load_checkpoint(path: str | Path) -> Pretrained:
    """Load a vlp checkpoint (or a run folder's latest) with its preprocessing and tokenizer."""
    folder = resolve_checkpoint(path)
    for name in (ARCH_FILE, PREPROCESS_FILE, "tokenizer.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
    family, config = parse_model_config(json.loads((folder / ARCH_FILE).read_text()))
    model = family.model_cls(config)
    load_weights(model, folder / WEIGHTS_FILE)
    model.eval()
    image_config = from_dict(ImageConfig, json.loads((folder / PREPROCESS_FILE).read_text()), prefix="preprocess")
    return Pretrained(family, config, model, image_config, Tokenizer.from_file(folder), folder)
