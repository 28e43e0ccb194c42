"""Image-text retrieval: texts ranked against images by embedding similarity, and, for a model with an
image-text matching head, each query's top K re-scored by that head, as the matching-head papers report it.
Evaluated with CLIP_benchmark's recall@K names (`vlp.evals.retrieval`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlp.abilities import EmbedsImages, EmbedsTexts, MatchesImageText
from vlp.config import PositiveInt
from vlp.data.sources import read_captions
from vlp.errors import BadQuery
from vlp.evals import image_text_similarity
from vlp.evals.retrieval import reranked_retrieval, zeroshot_retrieval
from vlp.flags import option
from vlp.tasks.base import EvalResult, Evaluation, ImageInput, PredictFunction, Task, batch_starts, per_item
from vlp.tasks.embedding import EXAMPLE_TEXTS, EmbeddingPredictor


class MatchingPredictor(EmbeddingPredictor):
    """The embeddings plus the image-text matching head, which scores an image and a text read together."""

    abilities = (EmbedsImages, EmbedsTexts, MatchesImageText)
    task = "match images and texts (an image-text matching head re-ranks)"

    @per_item(2)
    @torch.no_grad()
    def match_probabilities(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """p(match) [N] of each aligned pair (images[i], texts[i]) from the matching head's two-way softmax."""
        if len(images) != len(texts):
            raise BadQuery(f"{len(texts)} texts for {len(images)} images")
        out = []
        for start, pixels in zip(range(0, len(images), self.batch_size), self.pixel_batches(images, "matching"),
                                 strict=True):
            ids, mask = self.tokenizer(list(texts[start : start + self.batch_size]))
            with self.autocast:
                tokens = self.model.encode_image_tokens(pixels)[1]
                logits = self.model.itm_logits(ids.to(self.device), mask.to(self.device), tokens)
            out.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def matcher(
        self, images: Sequence[ImageInput], texts: Sequence[str]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function of pairs (image_indices [P], text_indices [P]) -> match logits [P] of (images[i], texts[t]).
        Image tokens and text ids are computed once, here, and kept in memory."""
        tokens = []
        for pixels in self.pixel_batches(images, "image tokens"):
            with self.autocast:
                tokens.append(self.model.encode_image_tokens(pixels)[1])
        all_tokens = torch.cat(tokens)
        ids, mask = self.tokenizer(list(texts))

        @torch.no_grad()
        def match_logits(image_indices: torch.Tensor, text_indices: torch.Tensor) -> torch.Tensor:
            out = []
            for start in batch_starts(len(image_indices), self.batch_size, "re-ranking" if self.progress else None):
                pair_images = image_indices[start : start + self.batch_size].to(self.device)
                pair_texts = text_indices[start : start + self.batch_size]
                with self.autocast:
                    logits = self.model.itm_logits(
                        ids[pair_texts].to(self.device), mask[pair_texts].to(self.device), all_tokens[pair_images]
                    )
                out.append(logits[:, 1].float().cpu())
            return torch.cat(out)

        return match_logits


@dataclass
class RetrieveRequest:
    """Text queries against a set of images: each query's `k` most similar images."""

    queries: list[str] = option(help="texts to search with")
    images: list[str] = option(help="the images to search", image=True)
    k: PositiveInt = option(5, help="images returned per query")


@dataclass
class RetrieveResponse:
    results: list[list[dict[str, float]]]  # per query, best first: {"index": image index, "score": cosine}


def retrieve(functions: Any, request: RetrieveRequest) -> RetrieveResponse:
    if not request.queries or not request.images:
        raise BadQuery("give at least one query and one image")
    similarity = image_text_similarity(functions.require("embed_images")(request.images),
                                       functions.require("embed_texts")(request.queries)).T  # [Q, I]
    top = similarity.topk(min(request.k, len(request.images)), dim=1)
    return RetrieveResponse([[{"index": int(i), "score": float(s)} for s, i in zip(scores, indices, strict=True)]
                             for scores, indices in zip(top.values, top.indices, strict=True)])


@dataclass
class RetrievalEvalConfig:
    data: str = option(help="COCO captions JSON or CSV (several captions per image)")
    images: str | None = option(None, help="folder the image paths resolve against")
    rerank: PositiveInt | None = option(None, metavar="K", help="re-score each query's top K with the image-text "
                                        "matching head (a model that has one)")


def evaluate_retrieval(functions: Any, cfg: RetrievalEvalConfig) -> EvalResult:
    """Embedding retrieval; with `rerank` k, each query's top k re-scored by the matching head (k = 256 for
    COCO in the papers)."""
    embed_images, embed_texts = functions.require("embed_images"), functions.require("embed_texts")
    matcher = functions.require("matcher") if cfg.rerank else None
    items = read_captions(str(cfg.data), images_dir=cfg.images)
    images, captions = [i.path for i in items], [i.captions for i in items]
    metrics, similarity = zeroshot_retrieval(embed_images, embed_texts, images, captions)
    if matcher is None:
        return EvalResult("zeroshot_retrieval", str(cfg.data), metrics)
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    reranked = reranked_retrieval(similarity, text_to_image, matcher(images, texts), cfg.rerank)
    return EvalResult(f"reranked_retrieval (k={cfg.rerank})", str(cfg.data), reranked,
                      details={"embedding_metrics": metrics})


TASK = Task(
    name="retrieval",
    route="retrieve",
    abilities=((EmbedsImages, EmbedsTexts),),
    functions=(
        PredictFunction("match_probabilities", MatchingPredictor,
                        lambda f, images: f.match_probabilities(images, EXAMPLE_TEXTS[: len(images)])),
        PredictFunction("matcher", MatchingPredictor, lambda f, images: f.matcher(images, EXAMPLE_TEXTS)(
            torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))),
    ),
    request=RetrieveRequest,
    response=RetrieveResponse,
    respond=retrieve,
    example_request=lambda images: RetrieveRequest(EXAMPLE_TEXTS, images, k=2),
    evaluation=Evaluation("retrieval", "image-text retrieval", RetrievalEvalConfig, evaluate_retrieval),
)
