"""Evaluation tasks. Each receives predict functions and returns named metrics."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# A predict function: a batch of inputs (images or texts) -> embeddings [N, E]; image embeddings may be
# several vectors each, [N, Q, E] (BLIP-2's queries).
EmbedFn = Callable[[Sequence], torch.Tensor]


def image_text_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [I, T] of image embeddings [I, E] and text embeddings [T, E]; an image of several
    vectors [I, Q, E] scores each text by its best vector, as BLIP-2 does."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    if images.dim() == 3:
        return torch.einsum("iqe,te->itq", images, texts).amax(dim=-1)
    return images @ texts.T
