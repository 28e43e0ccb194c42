"""InstructBLIP's instruction tuning (spec `blip2-family.md` §7.2–7.3): the frozen language model's
next-token loss on the answer, after the soft prompt of the image(s) read under the instruction and the
instruction itself; the instruction, padding and soft prompt are not targets. Only the Q-Former, its
queries, `ln_vision` and the projection train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp.assets.tokenizer import Tokenizer
from vlp.config import ConfigError, Fraction
from vlp.losses import lm_loss
from vlp.models.instructblip import InstructBlipConfig
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


def instruction_tokenizer(model_cfg: InstructBlipConfig) -> Tokenizer:
    """The tokenizer of the Q-Former's instructions when a run starts from its pre-trained parts: that of the
    Q-Former's source, a BLIP-2 stage-1 checkpoint or a BERT folder (with the [DEC] token BLIP-2 adds)."""
    source = model_cfg.sources.qformer
    if source is None:
        raise ConfigError("config key 'model.sources.qformer': the Q-Former reads instructions in its own vocabulary; "
                          "name a BLIP-2 stage-1 checkpoint or a BERT folder (or start from an InstructBLIP "
                          "checkpoint with train.init_from)")
    if (Path(source) / "config.json").is_file():  # a BERT folder
        from vlp.convert.tokenizers import tokenizer_from_path

        tokenizer = tokenizer_from_path(source, context_length=min(model_cfg.qformer.context_length, 128))
        tokenizer.backend.add_special_tokens(["[DEC]"] if tokenizer.token_id("[DEC]") is None else [])
        return tokenizer
    from vlp.objectives.sources import stage1_qformer

    return stage1_qformer(source).tokenizer
