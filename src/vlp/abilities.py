"""What a loaded model can do, as typed interfaces. Each family declares its abilities in
`vlp.registry`; the tasks' predict functions are built from them (`vlp.tasks`), so nothing probes a model for
methods.

Tensors: images [B, 3, H, W] preprocessed; text [B, L] token ids with text_mask [B, L] (1 = real).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StepDecoder(Protocol):
    """Incremental decoding for `vlp.generation`: next-token logits from a key/value cache."""

    eos_token_id: int
    pad_token_id: int
    max_length: int | None

    def start_tokens(self, prompt: torch.Tensor) -> torch.Tensor:
        """The ids every sequence starts from [B, S + P]: the start token(s), then the prompt [B, P]."""

    def __call__(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Feed new tokens [B, t] (`real` is 0 for padding after a row finished) -> logits [B, V]."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (repeats allowed), in that order (beam search)."""


@runtime_checkable
class Ability(Protocol):
    """The base of every ability (an ability adds the methods it names)."""


@runtime_checkable
class EmbedsImages(Ability, Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, E]."""


@runtime_checkable
class EmbedsTexts(Ability, Protocol):
    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [B, E], in the image embeddings' space."""


@runtime_checkable
class GivesImageTokens(Ability, Protocol):
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's output tokens [B, N, D] before any pooling (frozen-feature probes)."""


@runtime_checkable
class CaptionsImages(Ability, Protocol):
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding [B, E], the tokens [B, N, D] the decoder reads)."""

    def caption_decoder(self, image_tokens: torch.Tensor) -> StepDecoder:
        """A step decoder grounded on the image tokens."""


@runtime_checkable
class MatchesImageText(Ability, Protocol):
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding [B, E], the tokens [B, N, D] the matching head reads)."""

    def itm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match) of aligned image-text pairs."""


@runtime_checkable
class AnswersQuestions(Ability, Protocol):
    # How a question is put to the model before tokenizing ("{}": as it is; BLIP-2: "Question: {} Answer:").
    question_template: str

    def encode_question(self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded question states [B, Lq, D]."""

    def answer_decoder_for(self, question_states: torch.Tensor, question_mask: torch.Tensor) -> StepDecoder:
        """A step decoder grounded on the question states."""

    def answer_logits(
        self, answer: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced next-token logits [A, La, V] of answers, each row given its question's states."""


@runtime_checkable
class FollowsInstructions(AnswersQuestions, Protocol):
    """The question (an instruction) is read by the image side too, tokenised by the checkpoint's
    `instruction` tokenizer (`vlp.assets`); images may be [B, F, 3, H, W], F images read one after the other."""

    def encode_question(
        self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
        instruction: torch.Tensor | None = None, instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-grounded question states, the image read under the instruction [B, Li] (its own tokens)."""


@runtime_checkable
class JudgesImagePairs(Ability, Protocol):
    def pair_logits(
        self, left: torch.Tensor, right: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """True / false logits [B, 2] (index 1 = true) of statements about (left, right) image pairs."""


@runtime_checkable
class DetectsBoxes(Ability, Protocol):
    """Open-vocabulary detection (OWL-ViT): boxes for text or image queries."""

    def embed_queries(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenised queries [..., L] -> query embeddings [..., E]."""

    def embed_image_query(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Example images [B, 3, S, S] with one normalised xyxy box each -> (query embeddings [B, E], token [B])."""

    def detect(self, images: torch.Tensor, query_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [Q, E] (or [T, Q, E], logits averaged over T) -> (boxes [B, N, 4] as (cx, cy, w, h) in
        [0, 1] of the input, logits [B, N, Q] of each box against each query)."""


ABILITIES: tuple[type[Ability], ...] = (
    EmbedsImages, EmbedsTexts, GivesImageTokens, CaptionsImages, MatchesImageText, AnswersQuestions,
    FollowsInstructions, JudgesImagePairs, DetectsBoxes,
)
