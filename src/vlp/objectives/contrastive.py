"""The dual-encoder objective: CLIP's InfoNCE or SigLIP's sigmoid loss on one forward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vlp.losses import contrastive_loss, sigmoid_loss
from vlp.models.clip import DualEncoder


@dataclass
class ContrastiveObjectiveConfig:
    loss: Literal["clip", "siglip"] = "clip"
    max_logit_scale: float = 100.0  # the learned scale is clamped to this after every step
    # Rows of the loss computed at a time, recomputed in backward: bounds the logits' memory (None = all).
    chunk_size: int | None = None


class ContrastiveObjective:
    def __init__(self, model: DualEncoder, cfg: ContrastiveObjectiveConfig):
        if cfg.loss == "siglip" and model.logit_bias is None:
            raise ValueError("the siglip loss needs a model with init_logit_bias set (SigLIP uses -10)")
        self.model = model
        self.cfg = cfg

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["image"], batch["text"], batch.get("text_mask"))
        if self.cfg.loss == "clip":
            loss = contrastive_loss(
                out.image_features, out.text_features, out.logit_scale, chunk_size=self.cfg.chunk_size
            )
        else:
            loss = sigmoid_loss(
                out.image_features, out.text_features, out.logit_scale, out.logit_bias, chunk_size=self.cfg.chunk_size
            )
        logs = {"contrastive_loss": loss, "logit_scale": out.logit_scale.detach()}
        if out.logit_bias is not None:
            logs["logit_bias"] = out.logit_bias.detach()
        return logs

    @torch.no_grad()
    def after_step(self) -> None:
        self.model.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
