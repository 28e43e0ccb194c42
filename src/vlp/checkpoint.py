"""vlp checkpoint folders: weights, architecture, preprocessing, tokenizer, and run state.

    model.safetensors   weights
    model.json          {"family": ..., architecture config}
    tokenizers/<name>/  the named tokenizers, each fixed to its context length (`vlp.assets`)
    image_processors/<name>/preprocess.json
                        the named image preprocessing (ImageConfig)
    state.json          step and run config (training checkpoints only)
    optimizer.pt        optimizer and schedule state (training checkpoints only; loaded weights_only)

A new folder is written under a temporary name and renamed into place, so a killed run never leaves
a half-written checkpoint where `--resume latest` would find it. Writing into a folder that exists
replaces only the checkpoint files above; nothing else there is touched. Weights that are not finite
are never written, nor loaded.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlp.assets import ASSET_FILES, IMAGE, TEXT, Assets
from vlp.assets.image import ImageConfig, ImageTransform
from vlp.assets.tokenizer import Tokenizer
from vlp.config import ConfigError, to_dict
from vlp.errors import CheckpointError
from vlp.model_size import LOAD_BYTES_PER_PARAMETER, check_model_fits
from vlp.registry import Family, parse_model_config

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "model.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILES = (WEIGHTS_FILE, ARCH_FILE, STATE_FILE, OPTIMIZER_FILE, *ASSET_FILES)


@dataclass
class Pretrained:
    """A loaded model with the named assets (tokenizers, image preprocessing) it was trained with."""

    family: Family
    config: Any
    model: nn.Module
    assets: Assets
    path: Path

    @property
    def tokenizer(self) -> Tokenizer:
        """The `text` tokenizer."""
        return self.assets.tokenizer(TEXT, where=self.path)

    @property
    def image_config(self) -> ImageConfig:
        """The `image` preprocessing."""
        return self.assets.image_config(IMAGE, where=self.path)

    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.image_config, train=False)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """`safetensors.save_file`, leaving the file with the mode every other file gets (it creates 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_torch_file(path: str | Path) -> Any:
    """A torch-saved file of tensors, numbers and containers (weights only: no pickled object is built, so no
    code in it runs); a damaged file or one holding other objects is a one-line `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects besides tensors and numbers; vlp does not load it, "
                              "since loading it could run code") from None
    except (RuntimeError, EOFError, ValueError, AttributeError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is damaged or not a torch file ({reason})") from None


def first_nonfinite(weights: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point tensor holding a NaN or an infinity, by name, or None."""
    for key, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return key
    return None


def _aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Tied weights (a language model's output layer sharing its input embeddings): name -> the first name
    holding the same tensor."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases = {}
    for key, value in state_dict.items():
        identity = (value.data_ptr(), tuple(value.shape))
        if value.numel() and identity in first:
            aliases[key] = first[identity]
        else:
            first.setdefault(identity, key)
    return aliases


def without_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tied tensor once (safetensors refuses to write one tensor under two names)."""
    aliases = _aliases(state_dict)
    return {k: v for k, v in state_dict.items() if k not in aliases}


def save_checkpoint(
    folder: str | Path,
    *,
    family: Family,
    model_config: Any,
    model: nn.Module | dict[str, torch.Tensor],
    assets: Assets,
    state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder. `model` is the module, or its state dict when it was gathered from shards.

    The files are written to a temporary folder first; a new folder is then renamed into place, and in a
    folder that exists only the checkpoint files are replaced. Non-finite weights are refused."""
    folder = Path(folder)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    weights = {k: v.detach().cpu().contiguous() for k, v in without_aliases(state_dict).items()}
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"not writing {folder}: weight '{bad}' holds NaN or infinite values")
    # The process id keeps two writers (a second run on the same folder) off each other's files.
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_safetensors(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt", "family": family.name})
        (tmp / ARCH_FILE).write_text(json.dumps({"family": family.name, **to_dict(model_config)}, indent=1))
        assets.save(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if state is not None:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if folder.exists():
            _replace_checkpoint_files(tmp, folder)
        else:
            os.replace(tmp, folder)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC or _no_space_left(folder.parent)
        reason = "No space left on device" if full else (getattr(err, "strerror", None) or str(err))
        raise CheckpointError(f"cannot write checkpoint {folder}: {reason}") from err
    return folder


def _no_space_left(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def remove_unfinished(run_dir: str | Path) -> None:
    """Delete the temporary folders of checkpoints whose writing was killed (call with the run locked)."""
    for tmp in (Path(run_dir) / CHECKPOINTS_DIR).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_checkpoint_files(new: Path, folder: Path) -> None:
    """Move the files of `new` into `folder`, one atomic rename each; checkpoint files of an older
    checkpoint that the new one lacks (a training state, say) are removed. Nothing else is touched."""
    written = {p.name for p in new.iterdir()}
    for name in CHECKPOINT_FILES:
        if name not in written or (folder / name).is_dir():
            _remove(folder / name)
    for name in written:
        os.replace(new / name, folder / name)
    new.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def is_checkpoint_folder(path: str | Path) -> bool:
    return (Path(path) / ARCH_FILE).is_file()


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


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, refused with its name when it is truncated, not safetensors, or not finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"{path}: weight '{bad}' holds NaN or infinite values (a diverged run?)")
    return weights


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights, naming any missing, unexpected or mis-shaped key."""
    weights = read_weights(path)
    expected = model.state_dict()
    aliases = _aliases(expected)  # tied weights are stored once, under their first name
    missing = sorted(set(expected) - set(weights) - {k for k, v in aliases.items() if v in weights})
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(weights, strict=not aliases)


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint, refused with its name when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def build_model(family: Family, config: Any, *, bytes_per_parameter: int, what: str) -> nn.Module:
    """The family's model, once its size is known to fit in this machine's memory."""
    check_model_fits(family.model_cls, config, bytes_per_parameter=bytes_per_parameter, what=what)
    return family.model_cls(config)


def load_checkpoint(path: str | Path) -> Pretrained:
    """Load a vlp checkpoint (or a run folder's latest) with its preprocessing and tokenizer."""
    folder = resolve_checkpoint(path)
    if not (folder / ARCH_FILE).is_file():
        raise CheckpointError(f"{folder} is incomplete: {ARCH_FILE} is missing")
    arch = read_json(folder / ARCH_FILE)
    if not isinstance(arch, dict):
        raise CheckpointError(f"{folder / ARCH_FILE} must hold a mapping with the model's family and shapes")
    try:
        family, config = parse_model_config(arch)
    except ConfigError as err:
        raise CheckpointError(f"{folder}: {err}") from err
    assets = Assets.load(folder)
    check_assets(family, assets, folder)
    model = build_model(family, config, bytes_per_parameter=LOAD_BYTES_PER_PARAMETER, what=str(folder / ARCH_FILE))
    load_weights(model, folder / WEIGHTS_FILE)
    model.eval()
    return Pretrained(family, config, model, assets, folder)


def check_assets(family: Family, assets: Assets, where: Path) -> None:
    """Every asset the family reads with is there; an error naming the first one missing."""
    if IMAGE not in assets.image_processors:
        raise CheckpointError(f"{where} is incomplete: its image preprocessing is missing "
                              "(image_processors/image/preprocess.json, or preprocess.json)")
    for name, what in family.tokenizers:
        if name not in assets.tokenizers:
            raise CheckpointError(f"{where} is incomplete: a {family.name} model needs its {what} ('{name}' "
                                  f"tokenizer, tokenizers/{name}/), and this checkpoint has none")
