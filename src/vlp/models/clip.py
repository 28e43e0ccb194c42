"""The dual encoder: CLIP (softmax contrastive), SigLIP (pairwise sigmoid) and ALIGN-style towers.

One image tower, one text tower, linear projections into a shared space, L2-normalised embeddings,
a learned log-temperature and, for SigLIP, a learned bias. The loss lives in `vlp.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import PositiveInt
from vlp.towers import ImageTowerConfig, TextConfig, TextTransformer, VisionConfig, build_image_tower


@dataclass
class DualEncoderConfig:
    embed_dim: PositiveInt = 512
    vision: ImageTowerConfig = field(default_factory=VisionConfig)  # kind: vit (default) or convnet
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # SigLIP: log(10)
    init_logit_bias: float | None = None  # SigLIP: -10; None = no bias parameter
    # SigLIP's released models use the MAP head output as the image embedding, with no projection.
    vision_projection: bool = True
    text_projection_bias: bool = False

    def __post_init__(self) -> None:
        if not self.vision_projection and self.vision.width != self.embed_dim:
            raise ValueError(
                f"vision_projection: false needs vision.width ({self.vision.width}) == embed_dim ({self.embed_dim})"
            )


@dataclass
class DualEncoderOutput:
    image_features: torch.Tensor  # [B, E], L2-normalised
    text_features: torch.Tensor  # [B, E], L2-normalised
    logit_scale: torch.Tensor  # scalar, exp of the learned log-scale
    logit_bias: torch.Tensor | None  # scalar or None


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.visual_projection = (
            nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False) if cfg.vision_projection else nn.Identity()
        )
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.text_projection_bias)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = (
            nn.Parameter(torch.tensor(cfg.init_logit_bias)) if cfg.init_logit_bias is not None else None
        )
        self._init_projections()

    def _init_projections(self) -> None:
        for proj, width in ((self.visual_projection, self.cfg.vision.width),
                            (self.text_projection, self.cfg.text.width)):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=width**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output tokens [B, N, D] before any pooling."""
        return self.visual.forward_features(images)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled, _ = self.visual(image)
        features = self.visual_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        pooled = self.text.encode(text, text_mask)
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> DualEncoderOutput:
        return DualEncoderOutput(
            image_features=self.encode_image(image),
            text_features=self.encode_text(text, text_mask),
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
        )
