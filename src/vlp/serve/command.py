"""`vlp serve`'s flags: what the command line gives the service (kept apart from the service's imports, so that
building the command line stays quick)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlp.config import PositiveFloat, PositiveInt
from vlp.errors import ConfigError
from vlp.flags import option


@dataclass
class ServeCommand:
    checkpoint: list[str] = option(default_factory=list, repeat=True, help="NAME=DIR: a model to serve under NAME (repeatable; a bare DIR "
                                   "is named after its folder)")
    index: list[str] = option(default_factory=list, repeat=True, help="NAME=DIR: a `vlp index` folder to search "
                              "(repeatable; its checkpoint is loaded when no --checkpoint is)")
    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(8000, help="port to listen on")
    max_batch_size: PositiveInt = option(32, help="items joined into one model call")
    max_wait_ms: PositiveFloat = option(5.0, help="how long a call waits for others to join it")
    max_queue: PositiveInt = option(256, help="calls waiting per model before requests get 429")
    timeout: PositiveFloat = option(120.0, help="seconds after which a request not yet computed is dropped")
    max_image_bytes: PositiveInt = option(20 * 2**20, help="largest encoded image")
    max_image_pixels: PositiveInt = option(40_000_000, help="largest image, width x height")
    max_body_bytes: PositiveInt = option(64 * 2**20, help="largest request body")
    device: str | None = option(None, help="cpu, cuda, cuda:1 ... (default: the best there is)")
    precision: Literal["fp32", "bf16", "auto"] = option("fp32", help="compute in fp32, bf16, or bf16 where the "
                                                         "hardware has it")


def models_of(specs: list[str], flag: str = "--checkpoint") -> dict[str, str]:
    """NAME=DIR (or DIR) specs -> {name: folder}; a name given twice is an error."""
    models: dict[str, str] = {}
    for spec in specs:
        name, _, folder = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not name or not folder:
            raise ConfigError(f"{flag} {spec!r}: expected NAME=DIR")
        if name in models:
            raise ConfigError(f"{flag}: two named {name!r}")
        models[name] = folder
    return models
