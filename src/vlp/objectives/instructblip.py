"""InstructBLIP's instruction tuning (spec `blip2-family.md` §7.2–7.3): the frozen language model's
next-token loss on the answer, after the soft prompt of the image(s) read under the instruction and the
instruction itself; the instruction, padding and soft prompt are not targets. Only the Q-Former, its
queries, `ln_vision` and the projection train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlp.config import Fraction
from vlp.losses import lm_loss
from vlp.objectives.blip import trim_padding
from vlp.objectives.blip2 import FrozenPartsObjective


@dataclass
class InstructBlipObjectiveConfig:
    label_smoothing: Fraction = 0.0


class InstructBlipObjective(FrozenPartsObjective):
    cfg: InstructBlipObjectiveConfig

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        answer, answer_mask = trim_padding(batch["answer"], batch["answer_mask"])
        instruction = {k: batch[k] for k in ("instruction", "instruction_mask") if k in batch}
        logits = self.model(batch["image"], batch["text"], batch["text_mask"], answer, answer_mask, **instruction)
        return {"lm_loss": lm_loss(logits, answer, answer_mask, label_smoothing=self.cfg.label_smoothing)}
