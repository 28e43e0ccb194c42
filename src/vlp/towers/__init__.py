"""Encoders built from the shared blocks: the vision and the text transformer."""

from vlp.towers.text import TextConfig, TextTransformer
from vlp.towers.vision import VisionConfig, VisionTransformer

__all__ = ["TextConfig", "TextTransformer", "VisionConfig", "VisionTransformer"]
