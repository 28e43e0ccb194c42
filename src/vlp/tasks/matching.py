"""Image-text matching: how well a text describes an image, scored by a model's matching head (the
probability it gives a match) or, for a model that only embeds, by the cosine of the two embeddings.
Evaluated over labelled pairs by ROC AUC and average precision (scikit-learn's definitions, step-wise, no
interpolation), with each method's scores of matching and mismatched pairs beside them."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vlp.abilities import EmbedsImages, EmbedsTexts, MatchesImageText
from vlp.config import PositiveInt
from vlp.data.sources import read_captions, resolve_image
from vlp.errors import BadQuery, DataError
from vlp.evals import EvalResult, paired_similarity
from vlp.flags import option
from vlp.tasks.base import Command, Evaluation, FunctionsFactory, ImageInput, PredictFunction, Task, per_item
from vlp.tasks.embedding import EXAMPLE_TEXTS, EmbeddingPredictor

Method = Literal["auto", "itm", "cosine"]


class PairSimilarityPredictor(EmbeddingPredictor):
    task = "score image-text pairs by their embeddings"

    @per_item(2)
    def pair_similarities(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """Cosine [N] of each aligned pair (images[i], texts[i]); an image of several vectors [N, Q, E] scores
        its text by its best vector, as retrieval does."""
        if len(images) != len(texts):
            raise BadQuery(f"{len(texts)} texts for {len(images)} images")
        if not texts:
            return torch.empty(0)
        return paired_similarity(self.embed_images(images), self.embed_texts(texts))


def match_scores(functions: Any, images: Sequence[ImageInput], texts: Sequence[str], method: Method = "auto"
                 ) -> tuple[torch.Tensor, str]:
    """Scores [N] of aligned pairs and the method that made them: the matching head's p(match) (`itm`), or the
    embeddings' cosine (`cosine`); `auto` takes the head when the model has one."""
    if method == "itm" or (method == "auto" and functions.match_probabilities is not None):
        return functions.require("match_probabilities")(images, texts), "itm"
    return functions.require("pair_similarities")(images, texts), "cosine"


@dataclass
class MatchRequest:
    """Image-text pairs, `images[i]` with `texts[i]`."""

    images: list[str] = option(help="image files", image=True)
    texts: list[str] = option(help="one text per image")
    method: Method = option("auto", help="itm: the matching head; cosine: the embeddings; auto: the head if any")


@dataclass
class MatchResponse:
    scores: list[float]
    method: str


def match(functions: Any, request: MatchRequest) -> MatchResponse:
    scores, method = match_scores(functions, request.images, request.texts, request.method)
    return MatchResponse(scores.tolist(), method)


@dataclass
class MatchOptions:
    image: str = option(help="the image", positional=True)
    texts: list[str] = option(help="texts to score against the image")
    method: Method = option("auto", help="itm: the matching head; cosine: the embeddings; auto: the head if any")


def _match_command(functions: FunctionsFactory, options: MatchOptions) -> None:
    response = match(functions({}), MatchRequest([options.image] * len(options.texts), options.texts, options.method))
    for text, score in sorted(zip(options.texts, response.scores, strict=True), key=lambda x: -x[1]):
        print(f"{score:.4f}  {text}  ({response.method})")


@dataclass
class MatchingEvalConfig:
    data: str = option(help="CSV of filepath,title,label (label 1: the text describes the image, 0: it does "
                       "not), or a caption file (CSV or COCO captions JSON) whose pairs all match, mismatched ones "
                       "drawn from other images' captions")
    images: str | None = option(None, help="folder the image paths resolve against")
    label_key: str = option("label", help="CSV column of the label")
    negatives: PositiveInt = option(1, help="mismatched pairs drawn per pair, for data without labels")
    seed: int = option(0, help="seed of the mismatched pairs")
    method: Method = option("auto", help="itm: the matching head; cosine: the embeddings; auto: the head if any")


def read_pairs(cfg: MatchingEvalConfig) -> tuple[list[Path], list[str], list[int]]:
    """(images, texts, labels) of the evaluation: a CSV's labelled pairs, or a caption file's pairs with drawn
    mismatched ones."""
    path = Path(cfg.data)
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if cfg.label_key in (reader.fieldnames or []):
                return _labelled_rows(path, reader, cfg)
    items = read_captions(str(path), images_dir=cfg.images)
    if len(items) < 2:
        raise DataError(f"{path}: mismatched pairs need captions of at least two images")
    rng = random.Random(cfg.seed)
    images, texts, labels = [], [], []
    for index, item in enumerate(items):
        for caption in item.captions:
            images.append(item.path), texts.append(caption), labels.append(1)
            for _ in range(cfg.negatives):
                other = rng.randrange(len(items) - 1)
                other += other >= index
                images.append(item.path), texts.append(rng.choice(items[other].captions)), labels.append(0)
    return images, texts, labels


def _labelled_rows(path: Path, reader: csv.DictReader, cfg: MatchingEvalConfig) -> tuple[list[Path], list[str],
                                                                                        list[int]]:
    roots = [Path(cfg.images)] if cfg.images else [path.parent, Path.cwd()]
    images, texts, labels = [], [], []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        image, text, label = (row.get(k) or "" for k in ("filepath", "title", cfg.label_key))
        if not image.strip() or not text.strip():
            raise DataError(f"{where}: a pair needs its filepath and its title")
        if label.strip() not in ("0", "1"):
            raise DataError(f"{where}: {cfg.label_key} {label!r} is not 0 or 1")
        images.append(resolve_image(image, roots))
        texts.append(text.strip())
        labels.append(int(label))
    return images, texts, labels


def matching_metrics(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    """ROC AUC (the Mann-Whitney U statistic over n+ n-, ties counted half) and average precision (the mean
    precision at each matching pair's rank, ties broken against them), with the mean score of each kind."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not positives or not negatives:
        raise DataError("matching metrics need both matching and mismatched pairs")
    from scipy.stats import mannwhitneyu  # imported here: scipy.stats takes a second to import

    auc = mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives))
    ranked = sorted(zip(scores, labels, strict=True), key=lambda x: (-x[0], x[1]))
    hits, precisions = 0, []
    for rank, (_, label) in enumerate(ranked, start=1):
        if label == 1:
            hits += 1
            precisions.append(hits / rank)
    return {"roc_auc": float(auc), "average_precision": sum(precisions) / len(precisions),
            "mean_score_matching": sum(positives) / len(positives),
            "mean_score_mismatched": sum(negatives) / len(negatives)}


def evaluate_matching(functions: Any, cfg: MatchingEvalConfig) -> EvalResult:
    images, texts, labels = read_pairs(cfg)
    scores, method = match_scores(functions, images, texts, cfg.method)
    protocol = {"itm": "the matching head's p(match)", "cosine": "the cosine of the image and text embeddings"}
    return EvalResult("image_text_matching", str(cfg.data), matching_metrics(scores.tolist(), labels),
                      protocol=f"{protocol[method]}; ROC AUC and average precision over {len(labels)} pairs "
                               f"({sum(labels)} matching)")


TASK = Task(
    name="matching",
    route="match",
    abilities=((MatchesImageText,), (EmbedsImages, EmbedsTexts)),
    functions=(PredictFunction("pair_similarities", PairSimilarityPredictor,
                               lambda f, images: f.pair_similarities(images, EXAMPLE_TEXTS[: len(images)])),),
    request=MatchRequest,
    response=MatchResponse,
    respond=match,
    example_request=lambda images: MatchRequest(images, EXAMPLE_TEXTS[: len(images)]),
    evaluation=Evaluation("matching", "image-text matching scores: ROC AUC and average precision", MatchingEvalConfig,
                          evaluate_matching),
    commands=(Command("match", "score texts against an image", MatchOptions, _match_command),),
)
