"""vlp: vision-language pretraining."""

from pathlib import Path

from vlp.checkpoint import Pretrained, load_checkpoint

__version__ = "0.1.0"


def load(path: str | Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None) -> Pretrained:
    """Load a model with its image preprocessing and tokenizer.

    `path` is a vlp checkpoint or run folder, a Hugging Face CLIPModel / SiglipModel folder, an open_clip
    folder (open_clip_config.json), or an open_clip state-dict file with its model `config` JSON.
    """
    from vlp.convert import load_pretrained  # the converters import the model families; keep `import vlp` light

    return load_pretrained(path, config=config, tokenizer=tokenizer)


__all__ = ["Pretrained", "load", "load_checkpoint"]
