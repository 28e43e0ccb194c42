"""Statements about image pairs (NLVR2): is each statement true of its (left, right) pair; evaluated as the
official NLVR2 evaluation (lil-lab/nlvr, nlvr2/eval/metrics.py) does, by accuracy and consistency (the share of
statements whose every pair is judged right), with the majority answer's baseline beside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlp.abilities import JudgesImagePairs
from vlp.data.nlvr import IMAGE_PAIR_STATEMENTS, read_nlvr
from vlp.errors import BadQuery
from vlp.flags import option
from vlp.tasks.base import EvalResult, Evaluation, ImageInput, PredictFunction, Predictor, Task, per_item


class NlvrPredictor(Predictor):
    """`true_probability(lefts, rights, sentences)`: p(statement is true of the pair)."""

    abilities = (JudgesImagePairs,)
    task = "judge statements about image pairs"

    @per_item(3)
    @torch.no_grad()
    def true_probability(
        self, lefts: Sequence[ImageInput], rights: Sequence[ImageInput], sentences: Sequence[str]
    ) -> torch.Tensor:
        if not len(lefts) == len(rights) == len(sentences):
            raise BadQuery(f"{len(lefts)} left images, {len(rights)} right images, {len(sentences)} sentences")
        out = []
        for start, left in zip(range(0, len(lefts), self.batch_size), self.pixel_batches(lefts, "judging pairs"),
                               strict=True):
            right = self.pixels(rights[start : start + self.batch_size])
            ids, mask = self.tokenizer(list(sentences[start : start + self.batch_size]))
            with self.autocast:
                logits = self.model.pair_logits(left, right, ids.to(self.device), mask.to(self.device))
            out.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.empty(0)


@dataclass
class JudgeRequest:
    """Statements, each about a pair of images."""

    lefts: list[str] = option(help="the left image of each pair", image=True)
    rights: list[str] = option(help="the right image of each pair", image=True)
    sentences: list[str] = option(help="the statements")


@dataclass
class JudgeResponse:
    true_probabilities: list[float]


def judge(functions: Any, request: JudgeRequest) -> JudgeResponse:
    found = functions.require("true_probability")(request.lefts, request.rights, request.sentences)
    return JudgeResponse(found.tolist())


@dataclass
class NlvrEvalConfig:
    data: str = option(help="JSON list of {images: [left, right], sentence, label}, or NLVR2's JSON Lines")
    images: str | None = option(None, help="folder the image paths resolve against (default: beside the file)")


def evaluate_nlvr(functions: Any, cfg: NlvrEvalConfig) -> EvalResult:
    true_probability = functions.require("true_probability")
    items = read_nlvr(cfg.data, cfg.images)
    probability = true_probability([i.left for i in items], [i.right for i in items], [i.sentence for i in items])
    labels = torch.tensor([i.label for i in items])
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    right = ((probability >= 0.5) == labels).tolist()
    return EvalResult("nlvr", str(cfg.data), {**nlvr_metrics(right, [i.statement for i in items]),
                                               "majority_baseline": majority},
                      protocol="NLVR2 official accuracy and consistency (lil-lab/nlvr nlvr2/eval/metrics.py)",
                      details={"statements": len({i.statement for i in items})})


def nlvr_metrics(right: Sequence[bool], statements: Sequence[str]) -> dict[str, float]:
    """Accuracy over examples, and consistency: the share of statements (grouped as the official evaluation
    groups them) whose every example is right."""
    every: dict[str, bool] = {}
    for ok, statement in zip(right, statements, strict=True):
        every[statement] = every.get(statement, True) and bool(ok)
    return {"accuracy": sum(map(bool, right)) / len(right), "consistency": sum(every.values()) / len(every)}


TASK = Task(
    name="nlvr",
    route="judge",
    abilities=((JudgesImagePairs,),),
    functions=(PredictFunction("true_probability", NlvrPredictor, lambda f, images: f.true_probability(
        images, images[::-1], ["a red circle", "two blue squares", "yes"][: len(images)])),),
    request=JudgeRequest,
    response=JudgeResponse,
    respond=judge,
    example_request=lambda images: JudgeRequest(images, images[::-1], ["yes"] * len(images)),
    evaluation=Evaluation("nlvr", "statements about image pairs (NLVR2): accuracy and consistency", NlvrEvalConfig, evaluate_nlvr),
    training=IMAGE_PAIR_STATEMENTS,
)
