"""InstructBLIP: BLIP-2 whose Q-Former reads the instruction too (spec `blip2-family.md` §7).

The instruction, tokenised by the Q-Former's own (BERT) tokenizer, joins the learned queries in every
self-attention layer, both ways (no causal mask); only the queries cross-attend to the frozen image tokens,
and only the query rows are projected into the frozen language model, which then reads the instruction
again, as text, after the soft prompt. The image encoder never sees the instruction.

`qformer.text_input: false` is LAVIS's `qformer_text_input=False`: the instruction goes to the language model
only, which makes the model a BLIP-2 (the paper's "without instruction-aware visual features" ablation).
Several images per sample ([B, F, 3, H, W]: an image pair, video frames) each get their own queries under
the same instruction, and their soft prompts follow each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlp.models.blip2 import Blip2, Blip2Config
from vlp.towers.qformer import QFormerConfig


@dataclass
class InstructBlipConfig(Blip2Config):
    # The instruction-aware Q-Former keeps its text side (word and position embeddings, text feed-forward).
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # An instruction is given as it is written.
    question_template: str = "{}"


class InstructBlip(Blip2):
    cfg: InstructBlipConfig

    @property
    def instruction_aware(self) -> bool:
        return self.cfg.qformer.text_input

    def query_outputs(
        self, image_tokens: torch.Tensor, *, frames: int = 1, instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The query rows [B * F, Q, D] of one bidirectional pass over [queries; instruction] (each frame's
        queries under its sample's instruction), or of the queries alone when the Q-Former reads no text."""
        if not self.instruction_aware:
            return self.qformer.query_states(image_tokens)[0]
        if instruction is None or instruction_mask is None:
            raise ValueError("InstructBLIP's Q-Former reads the instruction: pass its ids and mask, tokenised by "
                             "the Q-Former's tokenizer")
        ids, mask = instruction.repeat_interleave(frames, 0), instruction_mask.repeat_interleave(frames, 0)
        states = self.qformer.joint_states(image_tokens, ids, mask, "itm")
        return states[:, : self.cfg.qformer.num_queries]

    def encode_question(
        self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
        instruction: torch.Tensor | None = None, instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The soft prompt of the images read under the instruction, then the instruction as the language
        model's text: [B, F * Q + Lq, D_lm]."""
        prompt = self.soft_prompt(images, instruction=instruction, instruction_mask=instruction_mask)
        return self.question_states(prompt, question, question_mask)

    @torch.no_grad()
    def init_from(self, source: torch.nn.Module) -> list[str]:
        """Start from a BLIP-2 stage-2 model (everything it has: image encoder, the Q-Former's query path,
        projection, language model; the Q-Former's text side, which stage 2 lacks, stays as it was: from
        `sources.qformer`, a stage-1 checkpoint or BERT), or as BLIP-2 starts from a stage-1 model."""
        if not isinstance(source, Blip2):
            return super().init_from(source)
        ours, theirs = self.state_dict(), source.state_dict()
        wrong = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
        if wrong:
            raise ValueError(f"the BLIP-2 model does not fit this InstructBLIP's config: other shapes {wrong[:4]}")
        self.load_state_dict({k: v for k, v in theirs.items() if k in ours}, strict=False)
        return sorted(k for k in ours if k not in theirs)

    def forward(  # type: ignore[override]  # the instruction-tuning step, not BLIP-2's captioning one
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, answer: torch.Tensor,
        answer_mask: torch.Tensor, instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, La, V] of the answer (its first token, the start token, stands for the
        instruction's last position) after the image(s) read under the instruction and the instruction."""
        states = self.encode_question(image, text, text_mask, instruction, instruction_mask)
        return self.answer_logits(answer, answer_mask, states, text_mask)
