"""BLIP-2's two training stages (spec `blip2-family.md` §4–5).

Stage 1 (`Blip2QformerObjective`): ITC + ITM + ITG, equal weights, over a frozen image encoder.
- ITC: per-query image features against the global batch's texts, the best query's similarity over a
  learned temperature, label smoothing 0.1.
- ITM: for every text one image and for every image one text, drawn from the ITC softmax over the global
  batch, never the positive; pairs [pos, pos, neg] x [pos, neg, pos]; the head averaged over queries.
- ITG: text after [DEC], seeing the queries through their cached keys and values, label smoothing 0.1.

Stage 2 (`Blip2Objective`): the frozen language model's next-token loss on the caption after the soft
visual prompt; the start token, a prompt and padding are not targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.config import Fraction, NonNegativeFloat, NonNegativeInt
from vlp.distributed import all_gather_with_grad, local_sizes, rank, unwrap
from vlp.losses import itm_loss, lm_loss, max_query_contrastive_loss, sample_negatives
from vlp.objectives import Objective
from vlp.objectives.blip import trim_padding

log = logging.getLogger("vlp.train")


def log_trainable(model: nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("parameters: %s trained, %s frozen", f"{trainable:,}", f"{frozen:,}")


@dataclass
class Blip2QformerObjectiveConfig:
    itc_weight: NonNegativeFloat = 1.0
    itm_weight: NonNegativeFloat = 1.0
    itg_weight: NonNegativeFloat = 1.0
    hard_negatives: bool = True
    label_smoothing: Fraction = 0.1  # ITC and ITG


class Blip2QformerObjective(Objective):
    cfg: Blip2QformerObjectiveConfig

    @staticmethod
    def prepare(model: nn.Module, cfg: Blip2QformerObjectiveConfig) -> None:
        log_trainable(model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        image = batch["image"]
        model = unwrap(self.model)
        out = self.model(image, text, mask)
        sizes = local_sizes(image.shape[0], image.device)
        itc, image_to_text, text_to_image = max_query_contrastive_loss(
            out.image_features, out.text_features, out.temperature, label_smoothing=self.cfg.label_smoothing,
            sizes=sizes,
        )
        values: dict[str, torch.Tensor] = {"temperature": out.temperature.detach()}
        if self.cfg.itc_weight:
            values["itc_loss"] = self.cfg.itc_weight * itc
        if self.cfg.itm_weight:
            offset = sum(sizes[: rank()])
            negative_images = sample_negatives(text_to_image, offset, self.cfg.hard_negatives, floor=0.0)
            negative_texts = sample_negatives(image_to_text, offset, self.cfg.hard_negatives, floor=0.0)
            # ln_vision's output is gathered with its gradient: ln_vision trains on the negatives too.
            all_tokens = all_gather_with_grad(out.image_tokens, sizes)
            with torch.no_grad():
                all_text, all_mask = all_gather_with_grad(text, sizes), all_gather_with_grad(mask, sizes)
            itm_text = torch.cat([text, text, all_text[negative_texts]])
            itm_mask = torch.cat([mask, mask, all_mask[negative_texts]])
            itm_images = torch.cat([out.image_tokens, all_tokens[negative_images], out.image_tokens])
            itm, accuracy = itm_loss(model.itm_logits(itm_text, itm_mask, itm_images), positives=text.shape[0])
            values["itm_loss"], values["itm_accuracy"] = self.cfg.itm_weight * itm, accuracy
        if self.cfg.itg_weight:
            logits = model.lm_logits(text, mask, out.query_kv)
            values["itg_loss"] = self.cfg.itg_weight * lm_loss(logits, text, mask,
                                                               label_smoothing=self.cfg.label_smoothing)
        return values


@dataclass
class Blip2ObjectiveConfig:
    # Tokens after the start token that form a prompt such as "a photo of": fed, not predicted.
    prompt_length: NonNegativeInt = 0
    label_smoothing: Fraction = 0.0


class Blip2Objective(Objective):
    cfg: Blip2ObjectiveConfig

    @staticmethod
    def prepare(model: nn.Module, cfg: Blip2ObjectiveConfig) -> None:
        log_trainable(model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        logits = self.model(batch["image"], text, mask)
        loss = lm_loss(logits, text, mask, prompt_length=self.cfg.prompt_length,
                       label_smoothing=self.cfg.label_smoothing)
        return {"lm_loss": loss}
