"""A frozen image encoder: any vlp image tower (ViT or ConvNet, trained here or converted) kept frozen (no
gradients, eval mode, optionally bf16), with a trained LayerNorm on its tokens; what a query transformer
reads (spec `blip2-family.md` §2). `vision_feature_layer: -2` drops the tower's last block."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlp.config import PositiveFloat
from vlp.precision import DTYPES, Precision, default_device, resolve_precision
from vlp.towers import ImageTowerConfig, VisionConfig, build_image_tower
from vlp.towers.convnet import ConvNetConfig


def _eva_vit_g() -> VisionConfig:
    """EVA-CLIP ViT-g/14 as BLIP-2 uses it (spec §2.1): 1408 wide, 16 heads, MLP 6144, no pre- or post-norm."""
    return VisionConfig(image_size=224, patch_size=14, width=1408, layers=40, heads=16, mlp_ratio=6144 / 1408,
                        norm_eps=1e-6, patch_bias=True, ln_pre=False, ln_post=False)


@dataclass
class FrozenImageConfig:
    """The frozen image encoder and what the Q-Former reads of it."""

    vision: ImageTowerConfig = field(default_factory=_eva_vit_g)
    # -1: the tower's output; -2: its penultimate block's (BLIP-2 removes the last layer). ViT only.
    vision_feature_layer: Literal[-1, -2] = -2
    vision_precision: Precision = "auto"
    ln_vision_eps: PositiveFloat = 1e-5  # LAVIS's ln_vision; Hugging Face's post_layernorm uses 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.vision, ConvNetConfig) and self.vision_feature_layer != -1:
            raise ValueError("vision_feature_layer must be -1 for a ConvNet image tower (it has no blocks to drop)")


class FrozenImageEncoder(nn.Module):
    """The image tower (frozen: no gradients, eval mode, optionally bf16) and the trained `ln_vision`."""

    def __init__(self, cfg: FrozenImageConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        if cfg.vision_feature_layer == -2:
            del self.visual.blocks[-1]
            self.visual.ln_post = nn.Identity()  # the penultimate block's output is not final-normalised
        self.tower_dtype = DTYPES[resolve_precision(cfg.vision_precision, default_device())]
        self.visual.requires_grad_(False).to(self.tower_dtype)
        self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.ln_vision_eps)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        super().train(mode)
        self.visual.eval()  # no dropout or batch-statistics updates in the frozen tower, ever
        return self

    def tower_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tower's tokens [B, N, Dv], computed without gradients in its weights' precision, or in
        bf16 when a bf16 autocast is active (the trainer's and the predictors' bf16 path)."""
        with torch.no_grad():
            tokens = self.visual.forward_features(images.to(self.tower_dtype))
        return tokens.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> ln_vision(tower tokens) [B, N, Dv], in fp32."""
        tokens = self.tower_tokens(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.ln_vision(tokens)


def load_image_tower(encoder: FrozenImageEncoder, source: nn.Module) -> list[str]:
    """Copy a vlp model's image tower (`visual`) into the frozen encoder; blocks it dropped are skipped."""
    tower = getattr(source, "visual", None)
    if tower is None and isinstance(getattr(source, "image_encoder", None), FrozenImageEncoder):
        tower = source.image_encoder.visual
    if tower is None:
        raise ValueError(f"a {type(source).__name__} has no image tower to start a frozen image encoder from")
    ours = encoder.visual.state_dict()
    theirs = tower.state_dict()
    missing = sorted(set(ours) - set(theirs))
    wrong = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or wrong:
        raise ValueError(f"the image tower does not fit model.image.vision: missing {missing[:4]}, other shapes "
                         f"{wrong[:4]}; copy the source's vision section into model.image.vision")
    encoder.visual.load_state_dict({k: theirs[k].to(ours[k].dtype) for k in ours})
    return []
