"""The batches each data task yields, typed. Keys mean the same thing in every task:

    image       [B, 3, H, W]  preprocessed images
    text        [B, L]        token ids (captions, questions, statements)
    text_mask   [B, L]        1 at real tokens
    labels      [B]           class indices (NLVR2's true / false)
    boxes       [B, N, 4]     detection targets: (cx, cy, w, h) in [0, 1] of the (padded, square) image
    size                      samples kept; `bad` lists the skipped ones (`GoodBatches` counts and removes it)
"""

from __future__ import annotations

from typing import TypedDict

import torch

from vlp.data.sources import Skipped


class Batch(TypedDict):
    size: int
    bad: list[Skipped]


class CaptionBatch(Batch):
    """Image-caption pairs (contrastive, captioning and BLIP pre-training)."""

    image: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor


class VqaBatch(CaptionBatch):
    """Images with their questions as `text`; every question's distinct answers flattened, each with the
    row of its question (`answer_question`) and its share of the annotators (`answer_weight`)."""

    answer: torch.Tensor  # [A, La]
    answer_mask: torch.Tensor
    answer_question: torch.Tensor  # [A]
    answer_weight: torch.Tensor  # [A]


class InstructionBatch(Batch):
    """Images (or [B, F, 3, H, W] image sets) with an instruction and its answer in the language model's tokens
    (`text`, `answer`), and the instruction in the Q-Former's tokens (`instruction`) when it reads it."""

    image: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    answer: torch.Tensor
    answer_mask: torch.Tensor
    instruction: torch.Tensor
    instruction_mask: torch.Tensor


class ImagePairBatch(Batch):
    """Statements about pairs of images (NLVR2), `labels` 1 where true."""

    left: torch.Tensor
    right: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    labels: torch.Tensor


class DetectionBatch(Batch):
    """Images with their own query lists (`text` [B, Q, L], real ones in `query_mask` [B, Q]) and boxes
    (`box_mask` [B, M] the real ones), each box's multi-hot labels over its image's queries [B, M, Q]."""

    image: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    query_mask: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
