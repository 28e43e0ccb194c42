"""BLIP's pre-training objective: ITC + ITM with hard negatives + LM, from one image pass.

ITM negatives: for every text one image, and for every image one text, drawn with probability
softmax(ITC similarity / temperature) over the batch (gathered from every process when distributed),
never the positive itself nor a text that reads the same as it; `hard_negatives: false` draws them
uniformly instead (the paper's ablation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.config import Fraction, NonNegativeFloat, NonNegativeInt
from vlp.distributed import all_gather_with_grad, all_reduce_max, local_sizes, unwrap
from vlp.losses import (
    classification_loss,
    contrastive_loss,
    identical_texts,
    itm_loss,
    itm_negatives,
    lm_loss,
    momentum_distilled_contrastive_loss,
    weighted_answer_loss,
)
from vlp.objectives import Objective


@dataclass
class BlipObjectiveConfig:
    itc_weight: NonNegativeFloat = 1.0
    itm_weight: NonNegativeFloat = 1.0
    lm_weight: NonNegativeFloat = 1.0
    hard_negatives: bool = True
    label_smoothing: Fraction = 0.1
    # Tokens after the first ([DEC]) that form a prompt such as "a picture of ": not predicted.
    prompt_length: NonNegativeInt = 0
    # Momentum distillation (needs model.momentum): ITC targets mix alpha x the momentum encoders'
    # softmax with the one-hot labels; alpha ramps up from 0 over the first steps.
    alpha: Fraction = 0.4
    alpha_warmup_steps: NonNegativeInt = 2000


def trim_padding(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row of every process: BLIP runs three text
    passes, which then cost what the captions hold rather than the tokenizer's whole context. Padding is
    masked everywhere, so no output changes; every process keeps one length because ITM gathers texts."""
    length = int(all_reduce_max(mask.sum(dim=1).max()))
    return text[:, :length], mask[:, :length]


def gather_texts(text: torch.Tensor, mask: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's text ids and masks, gathered once per step for ITM's negatives and pairs."""
    with torch.no_grad():
        return all_gather_with_grad(text, sizes), all_gather_with_grad(mask, sizes)


def itm_pairs(
    text: torch.Tensor, mask: torch.Tensor, all_text: torch.Tensor, all_mask: torch.Tensor,
    image_tokens: torch.Tensor, negative_images: torch.Tensor, negative_texts: torch.Tensor, sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ITM batch of BLIP and BLIP-2: texts [pos, pos, neg] with images [pos, neg, pos], the negatives
    global row indices into the whole batch (`all_text`, `all_mask` from `gather_texts`). Image tokens
    are gathered with their gradient (what produced them trains on the negatives too)."""
    all_tokens = all_gather_with_grad(image_tokens, sizes)
    return (torch.cat([text, text, all_text[negative_texts]]), torch.cat([mask, mask, all_mask[negative_texts]]),
            torch.cat([image_tokens, all_tokens[negative_images], image_tokens]))


class BlipObjective(Objective):
    cfg: BlipObjectiveConfig

    @staticmethod
    def prepare(model: nn.Module, cfg: BlipObjectiveConfig) -> None:
        """Terms weighted 0 are not computed (CapFilt's LM-only captioner and ITC + ITM-only filter); the
        parameters only they use are frozen, so that every trained parameter gets a gradient, as DDP needs."""
        frozen = model.freeze_unused(itc=cfg.itc_weight > 0, itm=cfg.itm_weight > 0, lm=cfg.lm_weight > 0)
        if frozen:
            logging.getLogger("vlp.train").info("objective terms off: %d parameter tensors frozen", len(frozen))

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        image = batch["image"]
        blip = unwrap(self.model)
        out = self.model(image, text, mask)
        sizes = local_sizes(image.shape[0], image.device)  # every process's batch, gathered once per step
        values: dict[str, torch.Tensor] = {"temperature": out.temperature.detach()}
        if self.cfg.itc_weight:
            if blip.momentum_encoder is None:
                itc = contrastive_loss(out.image_features, out.text_features, 1 / out.temperature)
            else:
                itc = self._distilled_itc(blip, out, image, text, mask, sizes)
            values["itc_loss"] = self.cfg.itc_weight * itc
        if self.cfg.itm_weight:
            itm, accuracy = self._itm(blip, out, text, mask, sizes)
            values["itm_loss"], values["itm_accuracy"] = self.cfg.itm_weight * itm, accuracy
        if self.cfg.lm_weight:
            lm_logits = blip.lm_logits(text, mask, out.image_tokens)
            lm = lm_loss(
                lm_logits, text, mask, prompt_length=self.cfg.prompt_length, label_smoothing=self.cfg.label_smoothing
            )
            values["lm_loss"] = self.cfg.lm_weight * lm
        return values

    def _itm(
        self, blip: nn.Module, out: Any, text: torch.Tensor, mask: torch.Tensor, sizes: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss and accuracy over the positives and one hard negative per text and per image; every
        process picks its negatives among the whole global batch."""
        all_text, all_mask = gather_texts(text, mask, sizes)
        negative_images, negative_texts = itm_negatives(
            out.image_features, out.text_features, out.temperature, hard=self.cfg.hard_negatives,
            exclude=identical_texts(text, all_text), sizes=sizes,
        )
        pairs = itm_pairs(text, mask, all_text, all_mask, out.image_tokens, negative_images, negative_texts, sizes)
        return itm_loss(blip.itm_logits(*pairs), positives=text.shape[0])

    def _distilled_itc(
        self, blip: nn.Module, out: Any, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
        sizes: list[int],
    ) -> torch.Tensor:
        """ITC against the momentum features of the global batch and the queues, with soft targets."""
        blip.update_momentum_encoder()
        image_m, text_m = blip.momentum_features(image, text, mask)
        alpha = self.cfg.alpha * min(1.0, int(blip.momentum_steps) / max(1, self.cfg.alpha_warmup_steps))
        loss, image_m, text_m = momentum_distilled_contrastive_loss(
            out.image_features, out.text_features, out.temperature, image_m, text_m, blip.image_queue,
            blip.text_queue, alpha=alpha, sizes=sizes,
        )
        if blip.cfg.queue_size:
            blip.enqueue(image_m, text_m)
        return loss

    @torch.no_grad()
    def after_step(self) -> None:
        blip = unwrap(self.model)
        blip.temperature.clamp_(blip.cfg.min_temperature, blip.cfg.max_temperature)


@dataclass
class VqaObjectiveConfig:
    label_smoothing: Fraction = 0.1


class VqaObjective(Objective):
    """BLIP's VQA loss: every distinct answer of a question is decoded from the question's states and its
    summed token loss weighted by the share of annotators who gave it; summed, divided by the questions."""

    cfg: VqaObjectiveConfig

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        question_mask = batch["text_mask"]
        states = self.model(batch["image"], batch["text"], question_mask)
        rows = batch["answer_question"]
        logits = unwrap(self.model).answer_logits(
            batch["answer"], batch["answer_mask"], states[rows], question_mask[rows]
        )
        loss = weighted_answer_loss(
            logits, batch["answer"], batch["answer_mask"], batch["answer_weight"], batch["image"].shape[0],
            label_smoothing=self.cfg.label_smoothing,
        )
        return {"vqa_loss": loss}


@dataclass
class NlvrObjectiveConfig:
    label_smoothing: Fraction = 0.0


class NlvrObjective(Objective):
    """Cross-entropy of BLIP-NLVR's true / false head on statements about image pairs."""

    cfg: NlvrObjectiveConfig

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        logits = self.model(batch["left"], batch["right"], text, mask)
        loss, accuracy = classification_loss(logits, batch["labels"], label_smoothing=self.cfg.label_smoothing)
        return {"nlvr_loss": loss, "nlvr_accuracy": accuracy}
