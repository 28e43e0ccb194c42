"""CoCa's objective: the dual encoder's contrastive loss (InfoNCE, or sigmoid) plus the captioning loss,
from one forward pass, weighted 1 and 2 as the paper and open_clip do.

`embed` returns per-sample values only (features, and each caption's summed token loss and token
count), so gradient accumulation and the cross-process contrastive loss work as for the dual encoder.
The caption loss is the token mean over the global batch (`losses.token_mean_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp.config import Fraction, NonNegativeFloat
from vlp.losses import sequence_losses, token_mean_loss
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig


@dataclass
class CocaObjectiveConfig(ContrastiveObjectiveConfig):
    contrastive_weight: NonNegativeFloat = 1.0  # 0 fine-tunes captioning only (the term is still returned, as 0)
    caption_weight: NonNegativeFloat = 2.0
    label_smoothing: Fraction = 0.0


class CocaObjective(ContrastiveObjective):
    cfg: CocaObjectiveConfig

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        text, text_mask = batch["text"], batch["text_mask"]
        out = self.model(batch["image"], text, text_mask)
        length = out.caption_logits.shape[1]  # the model cut the text to the batch's longest
        text, text_mask = text[:, :length], text_mask[:, :length]
        return {
            "image_features": out.image_features,
            "text_features": out.text_features,
            "logit_scale": out.logit_scale,
            "logit_bias": out.logit_bias,
            "caption_token_loss": sequence_losses(
                out.caption_logits, text, text_mask, label_smoothing=self.cfg.label_smoothing
            ),
            "caption_tokens": text_mask[:, 1:].sum(dim=1),
        }

    def losses(self, embedded: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        logs = super().losses(embedded)
        logs["contrastive_loss"] = self.cfg.contrastive_weight * logs["contrastive_loss"]
        caption = token_mean_loss(embedded["caption_token_loss"], embedded["caption_tokens"])
        logs["caption_loss"] = self.cfg.caption_weight * caption
        return logs
