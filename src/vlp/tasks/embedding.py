"""Embedding: images and texts into one space (dual encoders and every family that embeds), image tokens
for frozen-feature probes, and the probe evaluation (a linear and an attentional probe trained on the
frozen features, `vlp.evals.probe`). Trained from image-text pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from vlp.abilities import EmbedsImages, EmbedsTexts, GivesImageTokens
from vlp.config import NonNegativeFloat, PositiveInt, Range
from vlp.data.pipeline import IMAGE_TEXT_PAIRS
from vlp.errors import BadQuery, ConfigError, NonFiniteOutput, UnsupportedTask
from vlp.evals import one_vector_each
from vlp.evals.probe import ProbeConfig, frozen_feature_probes, split_train_test
from vlp.evals.zeroshot import read_classification_data, read_lines
from vlp.flags import option
from vlp.outputs import replacing
from vlp.tasks.base import (
    Command,
    EvalResult,
    Evaluation,
    FunctionsFactory,
    ImageInput,
    PredictFunction,
    Predictor,
    Task,
    batch_starts,
    per_item,
)

EXAMPLE_TEXTS = ["a red circle", "two blue squares", "yes"]
OpenFraction = Annotated[float, Range(min=0, max=1, exclusive_min=True, exclusive_max=True)]


class EmbeddingPredictor(Predictor):
    """`embed_images` and `embed_texts`: L2-normalised float32 embeddings (bf16: within ~1e-2 of fp32)."""

    abilities = (EmbedsImages, EmbedsTexts)
    task = "embed images and texts"
    default_batch_size = 256

    @torch.no_grad()
    def _per_image_batch(
        self, images: Sequence[ImageInput], encode: Callable[[torch.Tensor], torch.Tensor], empty: tuple[int, ...]
    ) -> torch.Tensor:
        out = []
        for pixels in self.pixel_batches(images, "embedding images"):
            with self.autocast:
                out.append(encode(pixels).float().cpu())
        return torch.cat(out) if out else torch.empty(empty)

    def _finite(self, embeddings: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.isfinite(embeddings).all():
            raise NonFiniteOutput(f"{self.pretrained.path}: the model's {what} embeddings are NaN or infinite "
                                  "(did its training diverge?)")
        return embeddings

    @per_item(1)
    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL or paths) -> [N, E]."""
        return self._finite(self._per_image_batch(images, self.model.encode_image, (0, 0)), "image")

    @per_item(1)
    def embed_image_tokens(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> the image encoder's output tokens [N, T, D], before any pooling (for frozen-feature probes);
        the model must also give image tokens (`GivesImageTokens`)."""
        if not self.pretrained.family.can(GivesImageTokens):
            raise UnsupportedTask(f"{self.pretrained.path}: {self.pretrained.family.name} models cannot give image "
                                  "tokens (its family does not declare GivesImageTokens)")
        return self._per_image_batch(images, self.model.image_tokens, (0, 0, 0))

    @per_item(1)
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [N, E]. Batches are cut from the texts sorted by length: a causal text tower computes
        only up to each batch's longest text, so similar lengths together waste little on padding."""
        if not texts:
            return torch.empty(0, 0)
        ids, mask = self.tokenizer(list(texts))
        order = mask.sum(dim=1).argsort(stable=True)
        out = []
        for start in batch_starts(len(texts), self.batch_size, "embedding texts" if self.progress else None):
            rows = order[start : start + self.batch_size]
            with self.autocast:
                out.append(self.model.encode_text(ids[rows].to(self.device), mask[rows].to(self.device)).float().cpu())
        embeddings = torch.empty(len(texts), out[0].shape[1])
        embeddings[order] = torch.cat(out)
        return self._finite(embeddings, "text")


@dataclass
class EmbedRequest:
    """Texts or images (paths, or images decoded by the caller) to embed; or both, with `weights`: one
    embedding per (image, text) pair, the weighted sum of the two (a combined image-and-text search query)."""

    texts: list[str] = option(default_factory=list, help="texts to embed")
    images: list[str] = option(default_factory=list, help="image files to embed", image=True)
    weights: list[float] = option(default_factory=list, help="with texts and images: the image's weight and the "
                                  "text's, e.g. 0.5 0.5 (each embedding is normalised, then summed and normalised)")


@dataclass
class EmbedResponse:
    embeddings: list[list[float]]  # L2-normalised, one row per input


def embed(functions: Any, request: EmbedRequest) -> EmbedResponse:
    if request.texts and request.images:
        return EmbedResponse(_combined(functions, request).tolist())
    if request.weights:
        raise BadQuery("weights combine an image with a text: give both images and texts")
    if not request.texts and not request.images:
        raise BadQuery("give texts or images to embed (or both, with weights)")
    found = functions.require("embed_images")(request.images) if request.images else \
        functions.require("embed_texts")(request.texts)
    return EmbedResponse(found.tolist())


def _combined(functions: Any, request: EmbedRequest) -> torch.Tensor:
    """[N, E]: normalise(w_image x image_i + w_text x text_i), each embedding normalised first; an image of
    several vectors (a query transformer's) counts as their mean."""
    if len(request.weights) != 2:
        raise BadQuery("with both images and texts, give weights: the image's and the text's (e.g. [0.5, 0.5])")
    if len(request.images) != len(request.texts):
        raise BadQuery(f"{len(request.images)} images and {len(request.texts)} texts: give one text per image")
    images = one_vector_each(functions.require("embed_images")(request.images))
    texts = one_vector_each(functions.require("embed_texts")(request.texts))
    w_image, w_text = request.weights
    return F.normalize(w_image * images + w_text * texts, dim=-1)


@dataclass
class EmbedOptions:
    out: str = option(help="the .npy file to write")
    images: list[str] = option(default_factory=list, help="image files")
    texts: list[str] = option(default_factory=list, help="texts")
    texts_file: str | None = option(None, help="a file of texts, one per line")


def _embed_command(functions: FunctionsFactory, options: EmbedOptions) -> None:
    texts = list(options.texts)
    if options.texts_file:
        texts += read_lines(options.texts_file)
    if options.images and texts:
        raise ConfigError("vlp embed writes one array: give --images, or --texts / --texts-file, not both")
    if not options.images and not texts:
        raise ConfigError("vlp embed needs --images, --texts or a --texts-file with at least one line")
    predict = functions({})
    predict.require("embed_images")
    embeddings = predict.embed_images(options.images) if options.images else predict.embed_texts(texts)
    # numpy names an array file .npy; the file written is said by its real name.
    out = options.out if options.out.endswith(".npy") else f"{options.out}.npy"
    with replacing(out, "wb") as handle:
        np.save(handle, embeddings.numpy())
    print(f"{tuple(embeddings.shape)} embeddings written to {out}")


@dataclass
class ProbeEvalConfig:
    data: str = option(help="training images: ImageFolder directory or CSV with filepath,label")
    classnames: str = option(help="class names, one per line")
    test: str | None = option(None, help="test images (default: a seeded --test-fraction of --data)")
    test_fraction: OpenFraction = option(0.3, help="share of --data held out for testing, without --test")
    steps: PositiveInt = option(500, help="optimiser steps of each probe")
    lr: NonNegativeFloat = option(3e-3, help="learning rate of the probes")
    weight_decay: NonNegativeFloat = option(1e-4, help="weight decay of the probes")
    heads: PositiveInt = option(4, help="heads of the attentional probe's pooler")


def evaluate_probe(functions: Any, cfg: ProbeEvalConfig) -> EvalResult:
    """Linear and attentional probes on frozen image features: trained on `data`, scored on `test`, or on a
    seeded `test_fraction` of `data` when no test set is given."""
    functions.require("embed_images")
    names = read_lines(cfg.classnames)
    paths, labels = read_classification_data(cfg.data, names)
    if cfg.test is None:
        train_paths, train_labels, test_paths, test_labels = split_train_test(paths, labels, cfg.test_fraction)
    else:
        (train_paths, train_labels), (test_paths, test_labels) = (paths, labels), read_classification_data(cfg.test,
                                                                                                            names)
    probe = ProbeConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, heads=cfg.heads)
    metrics = frozen_feature_probes(functions.embed_images, functions.require("embed_image_tokens"),
                                    (train_paths, train_labels), (test_paths, test_labels), len(names), probe)
    return EvalResult("frozen_feature_probe", str(cfg.data), metrics,
                      details={"train_images": len(train_paths), "test_images": len(test_paths)})


TASK = Task(
    name="embedding",
    route="embed",
    abilities=((EmbedsImages, EmbedsTexts),),
    functions=(
        PredictFunction("embed_images", EmbeddingPredictor, lambda f, images: f.embed_images(images)),
        PredictFunction("embed_texts", EmbeddingPredictor, lambda f, _: f.embed_texts(EXAMPLE_TEXTS)),
        PredictFunction("embed_image_tokens", EmbeddingPredictor, lambda f, images: f.embed_image_tokens(images),
                        (GivesImageTokens,)),
    ),
    request=EmbedRequest,
    response=EmbedResponse,
    respond=embed,
    example_request=lambda images: EmbedRequest(texts=EXAMPLE_TEXTS),
    evaluation=Evaluation("probe", "linear and attentional probes trained on frozen image features", ProbeEvalConfig,
                          evaluate_probe),
    commands=(Command("embed", "embed images or texts to a .npy", EmbedOptions, _embed_command),),
    training=IMAGE_TEXT_PAIRS,
)
