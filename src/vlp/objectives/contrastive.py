"""The dual-encoder objective: CLIP's InfoNCE or SigLIP's sigmoid loss on one forward pass.

It comes in two halves, `embed` (the forward pass) and `losses` (features -> named losses), so that
gradient accumulation can cache the features of earlier micro-batches and keep them as negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.distributed import unwrap
from vlp.losses import contrastive_loss, sigmoid_loss
from vlp.objectives import Objective


@dataclass
class ContrastiveObjectiveConfig:
    loss: Literal["clip", "siglip"] = "clip"
    max_logit_scale: PositiveFloat = 100.0  # the learned scale is clamped to this after every step
    # Rows of the loss computed at a time, recomputed in backward: bounds the logits' memory (None = all).
    chunk_size: PositiveInt | None = None


class ContrastiveObjective(Objective):
    accumulates = True
    cfg: ContrastiveObjectiveConfig

    def __init__(self, model: nn.Module, cfg: ContrastiveObjectiveConfig):
        """`model` is the DualEncoder, or the DDP wrapper around it that forward passes go through."""
        if cfg.loss == "siglip" and unwrap(model).logit_bias is None:
            raise ValueError("the siglip loss needs a model with init_logit_bias set (SigLIP uses -10)")
        super().__init__(model, cfg)

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Per-sample features ([b, ...]) and model-level scalars (0-dim) for `losses`."""
        out = self.model(batch["image"], batch["text"], batch.get("text_mask"))
        return {
            "image_features": out.image_features,
            "text_features": out.text_features,
            "logit_scale": out.logit_scale,
            "logit_bias": out.logit_bias,
        }

    def losses(self, embedded: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        image, text, scale = embedded["image_features"], embedded["text_features"], embedded["logit_scale"]
        if self.cfg.loss == "clip":
            loss = contrastive_loss(image, text, scale, chunk_size=self.cfg.chunk_size)
        else:
            loss = sigmoid_loss(image, text, scale, embedded["logit_bias"], chunk_size=self.cfg.chunk_size)
        logs = {"contrastive_loss": loss, "logit_scale": scale.detach()}
        if embedded["logit_bias"] is not None:
            logs["logit_bias"] = embedded["logit_bias"].detach()
        return logs

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.losses(self.embed(batch))

    @torch.no_grad()
    def after_step(self) -> None:
        unwrap(self.model).logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
