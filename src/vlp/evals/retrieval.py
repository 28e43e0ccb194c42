"""Zero-shot image-text retrieval with CLIP_benchmark's metric names (several captions per image)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlp.evals import EmbedFn, image_text_similarity


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Share of queries (rows) with at least one positive among their top-k columns."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return positives.gather(1, top).any(dim=1).float().mean().item()


def _positives(similarity: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """[T, I] True where caption t describes image i."""
    positives = torch.zeros_like(similarity, dtype=torch.bool)
    positives[torch.arange(len(text_to_image)), text_to_image] = True
    return positives


def retrieval_metrics(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """similarity: [T, I] text x image; text_to_image: [T] the image index of each caption."""
    positives = _positives(similarity, text_to_image)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(similarity, positives, k)
    for k in ks:
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(similarity.T, positives.T, k)
    return metrics


def zeroshot_retrieval(
    embed_images: EmbedFn,
    embed_texts: EmbedFn,
    images: Sequence,
    captions: Sequence[Sequence[str]],
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, float], torch.Tensor]:
    """images[i] has captions[i]. Returns (metrics, similarity [T, I])."""
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    similarity = image_text_similarity(embed_images(images), embed_texts(texts)).T
    return retrieval_metrics(similarity, text_to_image, ks), similarity


def reranked_retrieval(
    similarity: torch.Tensor,
    text_to_image: torch.Tensor,
    match_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Re-ranked retrieval: each query's top-k candidates by embedding similarity [T, I] are re-scored with
    the image-text matching head, score = ITM match logit + similarity. The rest follow in their
    embedding order, below every re-scored one, so recall@K for K > k is that of the embeddings past
    the first k (LAVIS scores them all -100, in no order). match_logits(image_indices [P], text_indices [P])
    -> [P]."""
    positives = _positives(similarity, text_to_image)
    metrics = {}
    for name, scores, hits in (
        ("image_retrieval", similarity, positives),
        ("text_retrieval", similarity.T, positives.T),
    ):
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [Q, k]
        queries = torch.arange(scores.shape[0])[:, None].expand_as(top)
        images, texts = (top, queries) if name == "image_retrieval" else (queries, top)
        rescored = match_logits(images.reshape(-1), texts.reshape(-1)).view_as(top).float() + scores.gather(1, top)
        below = rescored.min(dim=1).values - scores.max(dim=1).values - 1.0  # [Q]: shifts the rest under them
        reranked = scores + below[:, None]
        reranked[queries, top] = rescored
        for cutoff in ks:
            metrics[f"{name}_recall@{cutoff}"] = recall_at_k(reranked, hits, cutoff)
    return dict(sorted(metrics.items(), key=lambda item: item[0].startswith("text")))
