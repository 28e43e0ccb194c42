"""Encoders built from the shared blocks: the vision transformer, a compact ConvNet, the text towers."""

from torch import nn

from vlp.towers.convnet import ConvNet, ConvNetConfig
from vlp.towers.text import BertTextConfig, BertTextTransformer, TextConfig, TextTransformer
from vlp.towers.vision import VisionConfig, VisionTransformer

ImageTowerConfig = VisionConfig | ConvNetConfig


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    """The image tower a config names by its `kind`."""
    return ConvNet(cfg) if isinstance(cfg, ConvNetConfig) else VisionTransformer(cfg)


__all__ = ["BertTextConfig", "BertTextTransformer", "ConvNet", "ConvNetConfig", "ImageTowerConfig", "TextConfig", "TextTransformer", "VisionConfig",
           "VisionTransformer", "build_image_tower"]
