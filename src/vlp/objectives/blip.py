"""BLIP's pre-training objective: ITC + ITM with hard negatives + LM, from one image pass.

ITM negatives: for every text one image, and for every image one text, drawn with probability
softmax(ITC similarity) over the batch (gathered from every process when distributed), never the
positive itself; `hard_negatives: false` draws them uniformly instead (the paper's ablation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp.config import Fraction, NonNegativeFloat, NonNegativeInt
from vlp.distributed import all_gather_with_grad, is_distributed, local_sizes, rank, unwrap
from vlp.losses import contrastive_loss


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


def sample_negatives(
    similarity: torch.Tensor, offset: int, hard: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One column per row of `similarity` [b, B], never row i's positive column offset + i: drawn with
    probability softmax(similarity) (hard) or uniformly. BLIP adds 1e-4 so that no column is impossible."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    weights = similarity.float().softmax(dim=1) + 1e-4 if hard else torch.ones_like(similarity, dtype=torch.float)
    weights[rows, rows + offset] = 0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _next_token_targets(text: torch.Tensor, text_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    targets = text[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    targets[:, :prompt_length] = -100
    return targets


def lm_loss(
    logits: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    prompt_length: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy: position i predicts token i + 1; padding and the first
    `prompt_length` predicted tokens are ignored. logits [B, L, V], text and mask [B, L]."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        _next_token_targets(text, text_mask, prompt_length),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def sequence_losses(
    logits: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-sequence summed next-token cross-entropy [B] (the negative log-likelihood when not smoothed)."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        _next_token_targets(text, text_mask),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return per_token.sum(dim=1)


def trim_padding(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row of every process: BLIP runs three text
    passes, which then cost what the captions hold rather than the tokenizer's whole context. Padding is
    masked everywhere, so no output changes; every process keeps one length because ITM gathers texts."""
    length = mask.sum(dim=1).max()
    if is_distributed():
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return text[:, : int(length)], mask[:, : int(length)]


class BlipObjective:
    @staticmethod
    def prepare(model: nn.Module, cfg: BlipObjectiveConfig) -> None:
        """Terms weighted 0 are not computed (CapFilt's LM-only captioner and ITC + ITM-only filter); the
        parameters only they use are frozen, so that every trained parameter gets a gradient, as DDP needs."""
        frozen = model.freeze_unused(itc=cfg.itc_weight > 0, itm=cfg.itm_weight > 0, lm=cfg.lm_weight > 0)
        if frozen:
            logging.getLogger("vlp.train").info("objective terms off: %d parameter tensors frozen", len(frozen))

    def __init__(self, model: nn.Module, cfg: BlipObjectiveConfig):
        """`model` is the Blip model, or the DDP wrapper around it that forward passes go through."""
        self.model = model
        self.cfg = cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        batch = {**batch, "text": text, "text_mask": mask}
        image = batch["image"]
        blip = unwrap(self.model)
        out = self.model(image, text, mask)
        sizes = local_sizes(image.shape[0], image.device)
        offset = sum(sizes[: rank()])
        values: dict[str, torch.Tensor] = {"temperature": out.temperature.detach()}
        if self.cfg.itc_weight:
            if blip.momentum_encoder is None:
                itc = contrastive_loss(out.image_features, out.text_features, 1 / out.temperature)
            else:
                itc = self._distilled_itc(blip, out, batch, sizes, offset)
            values["itc_loss"] = self.cfg.itc_weight * itc
        if self.cfg.itm_weight:
            itm, accuracy = self._itm(blip, out, text, mask, sizes, offset)
            values["itm_loss"], values["itm_accuracy"] = self.cfg.itm_weight * itm, accuracy
        if self.cfg.lm_weight:
            lm_logits = blip.lm_logits(text, mask, out.image_tokens)
            lm = lm_loss(
                lm_logits, text, mask, prompt_length=self.cfg.prompt_length, label_smoothing=self.cfg.label_smoothing
            )
            values["lm_loss"] = self.cfg.lm_weight * lm
        return values

    def _itm(
        self, blip: nn.Module, out: Any, text: torch.Tensor, mask: torch.Tensor, sizes: list[int], offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss and accuracy over the positives and one hard negative per text and per image; every
        process picks its negatives among the whole global batch."""
        local = text.shape[0]
        all_tokens = all_gather_with_grad(out.image_tokens, sizes)
        with torch.no_grad():
            all_text, all_mask = all_gather_with_grad(text, sizes), all_gather_with_grad(mask, sizes)
            image_to_text = out.image_features @ all_gather_with_grad(out.text_features.detach(), sizes).T
            text_to_image = out.text_features @ all_gather_with_grad(out.image_features.detach(), sizes).T
            negative_images = sample_negatives(text_to_image, offset, self.cfg.hard_negatives)
            negative_texts = sample_negatives(image_to_text, offset, self.cfg.hard_negatives)
        itm_text = torch.cat([text, text, all_text[negative_texts]])
        itm_mask = torch.cat([mask, mask, all_mask[negative_texts]])
        itm_images = torch.cat([out.image_tokens, all_tokens[negative_images], out.image_tokens])
        logits = blip.itm_logits(itm_text, itm_mask, itm_images).float()
        labels = torch.cat([torch.ones(local), torch.zeros(2 * local)]).long().to(logits.device)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).float().mean()

    def _distilled_itc(
        self, blip: nn.Module, out: Any, batch: dict[str, Any], sizes: list[int], offset: int
    ) -> torch.Tensor:
        """ITC against the momentum features of the global batch and the queues, with soft targets."""
        blip.update_momentum_encoder()
        with torch.no_grad():
            image_m, text_m = blip.momentum_features(batch["image"], batch["text"], batch["text_mask"])
            image_m, text_m = all_gather_with_grad(image_m, sizes), all_gather_with_grad(text_m, sizes)
            image_columns = torch.cat([image_m, blip.image_queue])  # [B + Q, E]
            text_columns = torch.cat([text_m, blip.text_queue])
            scale = 1 / out.temperature.detach()
            local_m = slice(offset, offset + out.image_features.shape[0])
            alpha = self.cfg.alpha * min(1.0, int(blip.momentum_steps) / max(1, self.cfg.alpha_warmup_steps))
            one_hot = F.one_hot(
                torch.arange(local_m.start, local_m.stop, device=image_m.device), image_columns.shape[0]
            ).float()
            image_targets = alpha * (scale * image_m[local_m] @ text_columns.T).softmax(1) + (1 - alpha) * one_hot
            text_targets = alpha * (scale * text_m[local_m] @ image_columns.T).softmax(1) + (1 - alpha) * one_hot
        image_logits = (out.image_features.float() @ text_columns.T) / out.temperature
        text_logits = (out.text_features.float() @ image_columns.T) / out.temperature
        image_to_text = -(image_logits.log_softmax(1) * image_targets).sum(1).mean()
        text_to_image = -(text_logits.log_softmax(1) * text_targets).sum(1).mean()
        if blip.cfg.queue_size:
            blip.enqueue(image_m, text_m)
        return (image_to_text + text_to_image) / 2

    @torch.no_grad()
    def after_step(self) -> None:
        blip = unwrap(self.model)
        blip.temperature.clamp_(blip.cfg.min_temperature, blip.cfg.max_temperature)


@dataclass
class VqaObjectiveConfig:
    label_smoothing: Fraction = 0.1


class VqaObjective:
    """BLIP's VQA loss: every distinct answer of a question is decoded from the question's states and its
    summed token loss weighted by the share of annotators who gave it; summed, divided by the questions."""

    def __init__(self, model: nn.Module, cfg: VqaObjectiveConfig):
        self.model = model
        self.cfg = cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        question_mask = batch["question_mask"]
        states = self.model(batch["image"], batch["question"], question_mask)
        rows = batch["answer_question"]
        logits = unwrap(self.model).answer_logits(
            batch["answer"], batch["answer_mask"], states[rows], question_mask[rows]
        )
        losses = sequence_losses(
            logits, batch["answer"], batch["answer_mask"], label_smoothing=self.cfg.label_smoothing
        )
        return {"vqa_loss": (batch["answer_weight"] * losses).sum() / batch["image"].shape[0]}


@dataclass
class NlvrObjectiveConfig:
    label_smoothing: Fraction = 0.0


class NlvrObjective:
    """Cross-entropy of BLIP-NLVR's true / false head on statements about image pairs."""

    def __init__(self, model: nn.Module, cfg: NlvrObjectiveConfig):
        self.model = model
        self.cfg = cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, mask = trim_padding(batch["text"], batch["text_mask"])
        logits = self.model(batch["left"], batch["right"], text, mask).float()
        labels = batch["label"]
        return {
            "nlvr_loss": F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing),
            "nlvr_accuracy": (logits.argmax(dim=1) == labels).float().mean(),
        }
