"""Referring-expression grounding: precision@1, the share of expressions whose one chosen box overlaps
the referred object's at IoU >= 0.5 (the exact IoU of float xyxy boxes). MAttNet's and ALBEF's `computeIoU`
give the same answer except on boxes 1 px thick, whose overlap theirs counts as 0; MDETR counts GIoU >= 0.5.
The unit is the expression, as in RefCOCO.

Two ways to choose a box: an open-vocabulary detector takes the expression as its query and answers with the box
of the token that scores it highest, no proposals needed; an image-text matching model (a matching head) scores
each of the image's annotated regions, cropped, against the expression and answers with the best
(ground-truth proposals, as MAttNet-style evaluations use). Two baselines use the same proposals: a random
one, and the largest.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from vlp.data.grounding import ReferringExpression
from vlp.data.sources import as_rgb, load_image
from vlp.evals import EvalResult
from vlp.geometry import box_iou

Box = tuple[float, float, float, float]
IOU_RULE = ("exact IoU of float xyxy boxes: as MAttNet/ALBEF computeIoU except on boxes 1 px thick, whose "
            "overlap theirs counts as 0")


def precision_at_1(predicted: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> float:
    if not truth:
        return 0.0
    iou = box_iou(torch.tensor(predicted, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64))[0]
    return float((iou.diagonal() >= threshold).double().mean())


def detector_grounding(box_scores: Callable[..., list[tuple[torch.Tensor, torch.Tensor]]],
                       embed_queries: Callable[..., torch.Tensor], *, images_per_call: int = 16,
                       ) -> Callable[[Sequence[ReferringExpression]], list[Box]]:
    """A detector's answer to each expression: the box of its highest-scoring token for that query."""

    def ground(expressions: Sequence[ReferringExpression]) -> list[Box]:
        by_image: dict[Any, list[int]] = {}
        images: dict[Any, Any] = {}
        for index, expression in enumerate(expressions):
            by_image.setdefault(_key(expression.image), []).append(index)
            images[_key(expression.image)] = expression.image
        answers: list[Box] = [(0.0, 0.0, 0.0, 0.0)] * len(expressions)
        keys = list(by_image)
        for start in range(0, len(keys), images_per_call):
            chunk = keys[start : start + images_per_call]
            sentences = sorted({expressions[i].sentence for key in chunk for i in by_image[key]})
            column = {s: c for c, s in enumerate(sentences)}
            found = box_scores([images[key] for key in chunk], embed_queries(sentences))
            for key, (boxes, scores) in zip(chunk, found, strict=True):
                for index in by_image[key]:
                    token = int(scores[:, column[expressions[index].sentence]].argmax())
                    answers[index] = tuple(boxes[token].tolist())
        return answers

    return ground


def _key(image: Any) -> Any:
    """What identifies an image: its path, or the object itself for an image already decoded (PIL images
    are not hashable)."""
    return ("decoded", id(image)) if isinstance(image, Image.Image) else image


def _crop(image: Image.Image, box: Box, margin: float) -> Image.Image:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return image.crop((max(0, x0 - dx), max(0, y0 - dy), min(image.size[0], x1 + dx), min(image.size[1], y1 + dy)))


def region_scoring_grounding(match_probabilities: Callable[[Sequence[Any], Sequence[str]], torch.Tensor],
                             *, margin: float = 0.1) -> Callable[[Sequence[ReferringExpression]], list[Box]]:
    """An image-text matching model's answer: of the image's annotated regions (each cropped with `margin`
    of its size around it), the one it matches best with the expression."""

    def ground(expressions: Sequence[ReferringExpression]) -> list[Box]:
        crops, texts = [], []
        loaded: dict[Any, Image.Image] = {}
        for expression in expressions:
            image, key = expression.image, _key(expression.image)
            if key not in loaded:
                loaded[key] = as_rgb(image) if isinstance(image, Image.Image) else load_image(image)
            for box in expression.candidates:
                crops.append(_crop(loaded[key], box, margin))
                texts.append(expression.sentence)
        scores = match_probabilities(crops, texts)
        answers: list[Box] = []
        position = 0
        for expression in expressions:
            count = len(expression.candidates)
            answers.append(expression.candidates[int(scores[position : position + count].argmax())])
            position += count
        return answers

    return ground


def evaluate_grounding(
    ground: Callable[[Sequence[ReferringExpression]], list[Box]], expressions: Sequence[ReferringExpression],
    *, method: str, dataset: str, seed: int = 0,
) -> EvalResult:
    """Precision@1 of `ground` and of the random-proposal and largest-proposal baselines."""
    truth = [e.box for e in expressions]
    rng = random.Random(seed)
    random_boxes = [rng.choice(e.candidates) for e in expressions]
    largest = [max(e.candidates, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) for e in expressions]
    metrics = {
        "precision@1": precision_at_1(ground(expressions), truth),
        "random_proposal_precision@1": precision_at_1(random_boxes, truth),
        "largest_proposal_precision@1": precision_at_1(largest, truth),
    }
    return EvalResult("grounding", dataset, metrics, protocol=f"precision@1 at IoU >= 0.5 ({IOU_RULE}); {method}",
                      details={"expressions": len(expressions)})
