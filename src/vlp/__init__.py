"""vlp: vision-language pretraining.

`import vlp` imports nothing heavy (not even torch); `vlp.load` imports the model families and the
converters when it is called, never an objective, the trainer or the data pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlp.checkpoint import Pretrained

__version__ = "0.1.0"


def load(path: str | Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None) -> Pretrained:
    """Load a model with its image preprocessing and tokenizer.

    `path` is a vlp checkpoint or run folder, a Hugging Face CLIPModel / SiglipModel / BLIP folder, an
    open_clip folder (open_clip_config.json), or an open_clip state-dict file with its model `config` JSON.
    """
    from vlp.convert import load_pretrained

    return load_pretrained(path, config=config, tokenizer=tokenizer)


def __getattr__(name: str) -> Any:
    if name in ("Pretrained", "load_checkpoint"):
        import vlp.checkpoint

        return getattr(vlp.checkpoint, name)
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")


__all__ = ["Pretrained", "load", "load_checkpoint"]
