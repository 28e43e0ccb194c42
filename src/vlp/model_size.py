"""How big a model a config describes, known before any memory is allocated, and whether it fits here.

A config with a typo'd width or layer count (a checkpoint's `model.json` edited by hand, say) would
otherwise allocate until the machine swaps or the process is killed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError

# fp32 weights, plus the copy the state dict holds while it is loaded into the model.
LOAD_BYTES_PER_PARAMETER = 8
# fp32 weights, gradients and AdamW's two moments; activations come on top.
TRAIN_BYTES_PER_PARAMETER = 16


def _layer_fields(config: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the layer counts in a nested config (`layers`, `multimodal_layers`, ...)."""
    found = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            found += _layer_fields(value, (*path, field.name))
        elif isinstance(value, int) and (field.name == "layers" or field.name.endswith("_layers")):
            found.append((*path, field.name))
    return found


def _replace(config: Any, path: tuple[str, ...], value: int) -> Any:
    head, *rest = path
    inner = _replace(getattr(config, head), tuple(rest), value) if rest else value
    return dataclasses.replace(config, **{head: inner})


def _get(config: Any, path: tuple[str, ...]) -> int:
    for name in path:
        config = getattr(config, name)
    return config


def _count_on_meta(build: Callable[[Any], nn.Module], config: Any) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(config).parameters())


def count_parameters(build: Callable[[Any], nn.Module], config: Any) -> int:
    """Parameters of `build(config)`, counted on the meta device (nothing allocated). Every layer stack
    is built with one and with two layers and extrapolated, so an absurd layer count costs nothing."""
    paths = _layer_fields(config)
    small = config
    for path in paths:
        small = _replace(small, path, 1)
    base = _count_on_meta(build, small)
    total = base
    for path in paths:
        layers = _get(config, path)
        if layers != 1:
            per_layer = _count_on_meta(build, _replace(small, path, 2)) - base
            total += per_layer * (layers - 1)
    return total


def available_memory() -> int:
    """Bytes of memory this process could still take (Linux: MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


def check_model_fits(build: Callable[[Any], nn.Module], config: Any, *, bytes_per_parameter: int, what: str) -> int:
    """Refuse, before allocating, a model that needs more memory than this machine has; returns its
    parameter count. `what` names the config in the error (a file, or a config section)."""
    parameters = count_parameters(build, config)
    needed, available = parameters * bytes_per_parameter, available_memory()
    if needed > available:
        raise ConfigError(
            f"{what} describes a model of {parameters:,} parameters, which needs about {_gib(needed)} of "
            f"memory; this machine has {_gib(available)} available"
        )
    return parameters
