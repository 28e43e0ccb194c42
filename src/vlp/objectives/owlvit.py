"""OWL-ViT's detection objective: Hungarian matching per image, focal sigmoid classification, L1 and GIoU
box losses (weights 1 / 1 / 1, focal alpha 0.3 and gamma 2 as scenic's configs), and OWLv2's objectness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp.config import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from vlp.losses import detection_losses, objectness_loss
from vlp.objectives import Objective


@dataclass
class OwlVitObjectiveConfig:
    focal_alpha: Fraction = 0.3  # the positives' weight, 1 - it the negatives'; not Deformable DETR's 0.25
    focal_gamma: NonNegativeFloat = 2.0
    # Weights of the class, L1 and GIoU terms, in the matching cost and in the loss alike.
    class_weight: PositiveFloat = 1.0
    box_weight: PositiveFloat = 1.0
    giou_weight: PositiveFloat = 1.0
    objectness_weight: NonNegativeFloat = 1.0  # OWLv2 models only
    # OWLv2's instance selection: only the k tokens of highest objectness are matched and trained (None: all).
    objectness_top_k: PositiveInt | None = None


class OwlVitObjective(Objective):
    cfg: OwlVitObjectiveConfig

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out = self.model(batch["image"], batch["text"], batch["text_mask"], batch["query_mask"],
                         top_k=cfg.objectness_top_k)
        weights = (cfg.class_weight, cfg.box_weight, cfg.giou_weight)
        terms = detection_losses(out.logits, out.pred_boxes, batch["labels"], batch["boxes"], batch["box_mask"],
                                 batch["query_mask"], alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                 cost_weights=weights)
        losses = {name: weight * terms[name] for name, weight in zip(terms, weights, strict=True)}
        if out.objectness_logits is not None and cfg.objectness_weight:
            losses["objectness_loss"] = cfg.objectness_weight * objectness_loss(
                out.objectness_logits, out.logits, batch["query_mask"])
        return losses
