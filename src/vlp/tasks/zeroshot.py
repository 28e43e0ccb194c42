"""Zero-shot classification: class names through prompt templates, scored against the image embeddings;
evaluated with CLIP_benchmark's protocol and metric names (`vlp.evals.zeroshot`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlp.abilities import EmbedsImages, EmbedsTexts
from vlp.errors import BadQuery, ConfigError
from vlp.evals.zeroshot import (
    check_templates,
    read_classification_data,
    read_lines,
    zeroshot_classification,
    zeroshot_classifier,
)
from vlp.flags import option
from vlp.tasks.base import Command, EvalResult, Evaluation, FunctionsFactory, ImageInput, PredictFunction, Task
from vlp.tasks.embedding import EmbeddingPredictor

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ZeroShotPredictor(EmbeddingPredictor):
    task = "classify images zero-shot"

    def zeroshot_classifier(self, classnames: list[str], templates: list[str]
                            ) -> Callable[[Sequence[ImageInput]], torch.Tensor]:
        """A function of images -> class probabilities [N, C], from the logits the zero-shot evaluation scores."""
        logits = zeroshot_classifier(self.embed_images, self.embed_texts, classnames, templates)
        return lambda images: logits(images).softmax(dim=-1)


@dataclass
class ClassifyRequest:
    images: list[str] = option(help="image files", image=True)
    labels: list[str] = option(help="class names")
    templates: list[str] = option(default_factory=lambda: list(DEFAULT_TEMPLATES),
                                  help="prompt templates, {} for the class name (their embeddings averaged)")


@dataclass
class ClassifyResponse:
    probabilities: list[dict[str, float]]  # per image: label -> probability, best first


def classify(functions: Any, request: ClassifyRequest) -> ClassifyResponse:
    if not request.labels:
        raise BadQuery("no labels: give at least one class name")
    templates = check_templates(list(request.templates), "the templates")
    probabilities = functions.require("zeroshot_classifier")(list(request.labels), templates)(request.images)
    return ClassifyResponse([dict(sorted(zip(request.labels, row.tolist(), strict=True), key=lambda x: -x[1]))
                             for row in probabilities])


@dataclass
class ClassifyOptions:
    image: list[str] = option(help="image files", positional=True)
    labels: str = option(help='comma-separated class names, e.g. "cat,dog"')
    templates: str | None = option(None, help="templates file, one per line with {}")


def _classify_command(functions: FunctionsFactory, options: ClassifyOptions) -> None:
    labels = [label.strip() for label in options.labels.split(",") if label.strip()]
    if not labels:
        raise ConfigError(f"--labels {options.labels!r} names no class: give comma-separated names, e.g. \"cat,dog\"")
    templates = check_templates(read_lines(options.templates), options.templates) if options.templates else \
        list(DEFAULT_TEMPLATES)
    response = classify(functions({}), ClassifyRequest(options.image, labels, templates))
    for path, scores in zip(options.image, response.probabilities, strict=True):
        print(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in list(scores.items())[:5]))


@dataclass
class ZeroShotEvalConfig:
    data: str = option(help="ImageFolder directory or CSV with filepath,label")
    classnames: str = option(help="class names, one per line")
    templates: str = option(help="prompt templates, one per line with {} or {c}")


def evaluate_zeroshot(functions: Any, cfg: ZeroShotEvalConfig) -> EvalResult:
    names = read_lines(cfg.classnames)
    prompts = check_templates(read_lines(cfg.templates), cfg.templates)
    paths, labels = read_classification_data(cfg.data, names)
    metrics, _ = zeroshot_classification(functions.require("embed_images"), functions.require("embed_texts"), paths,
                                         labels, names, prompts)
    return EvalResult("zeroshot_classification", str(cfg.data), metrics)


TASK = Task(
    name="zeroshot",
    route="classify",
    abilities=((EmbedsImages, EmbedsTexts),),
    functions=(PredictFunction("zeroshot_classifier", ZeroShotPredictor,
                               lambda f, images: f.zeroshot_classifier(["circle", "square"], ["a {}."])(images)),),
    request=ClassifyRequest,
    response=ClassifyResponse,
    respond=classify,
    example_request=lambda images: ClassifyRequest(images, ["circle", "square"]),
    evaluation=Evaluation("zeroshot", "zero-shot classification", ZeroShotEvalConfig, evaluate_zeroshot),
    commands=(Command("classify", "zero-shot classify images", ClassifyOptions, _classify_command),),
)
