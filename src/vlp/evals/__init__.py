"""The metric math behind the tasks (`vlp.tasks`), each following the official implementation it names, and
the typed result every evaluation returns."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlp.outputs import write_text

# A predict function: a batch of inputs (images or texts) -> embeddings [N, E]; image embeddings may be
# several vectors each, [N, Q, E] (a query transformer's queries).
EmbedFn = Callable[[Sequence], torch.Tensor]


def image_text_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [I, T] of image embeddings [I, E] and text embeddings [T, E]; an image of several
    vectors [I, Q, E] scores each text by its best vector (max over queries)."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    if images.dim() == 3:
        return torch.einsum("iqe,te->itq", images, texts).amax(dim=-1)
    return images @ texts.T


def one_vector_each(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, E] unit vectors from embeddings [N, E], or [N, Q, E] (a query transformer's several vectors an
    image, which count as their mean): what an index stores and a combined query mixes."""
    embeddings = embeddings.float()
    return F.normalize(embeddings.mean(dim=1) if embeddings.dim() == 3 else embeddings, dim=-1)


def paired_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N] of aligned pairs (image i with text i): the diagonal of `image_text_similarity`,
    without the [N, N] matrix."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    if images.dim() == 3:
        return torch.einsum("nqe,ne->nq", images, texts).amax(dim=-1)
    return (images * texts).sum(dim=-1)


@dataclass
class EvalResult:
    """An evaluation's outcome: its named metrics (None where a metric is undefined), the protocol followed,
    and what else it reports (predictions, per-class figures), written beside them."""

    task: str
    dataset: str
    metrics: dict[str, float | None]
    protocol: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "dataset": self.dataset}
        if self.protocol is not None:
            out["protocol"] = self.protocol
        return {**out, "metrics": self.metrics, **self.details}

    def table(self) -> str:
        rows = [(name, "n/a" if value is None else f"{value:.4f}") for name, value in self.metrics.items()]
        width = max((len(name) for name, _ in rows), default=0)
        lines = [f"{self.task} on {self.dataset}"]
        if self.protocol is not None:
            lines.append(f"  ({self.protocol})")
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)

    def write(self, out: str | Path | None) -> None:
        if out:
            write_text(out, json.dumps(self.to_dict(), indent=1))
