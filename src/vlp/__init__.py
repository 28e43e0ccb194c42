"""vlp: vision-language pretraining."""

from vlp.checkpoint import Pretrained, load_checkpoint

__version__ = "0.1.0"


def load(path: str) -> Pretrained:
    """Load a model with its image preprocessing and tokenizer from a vlp checkpoint or run folder."""
    return load_checkpoint(path)


__all__ = ["Pretrained", "load", "load_checkpoint"]
