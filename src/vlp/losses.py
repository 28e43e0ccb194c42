"""Loss functions as pure math on features. Objectives pick and weight them.

All losses compute in fp32 whatever the autocast dtype of the features. Under a process group each
process passes its local batch and gets the loss of its own rows against the global batch; the mean
of those over processes is the single-process loss of the global batch, and with DDP's gradient
averaging the gradients are exact. The collectives live in `vlp.distributed`.

`chunk_size` bounds memory: rows are processed `chunk_size` at a time and recomputed in the backward
pass, so no [b, B] logit matrix is ever held whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from vlp.distributed import all_gather_with_grad, local_sizes, rank, ring_shift, world_size


def _sum_over_row_chunks(
    fn: Callable[..., torch.Tensor], rows: torch.Tensor, *others: object, chunk_size: int | None
) -> torch.Tensor:
    """sum_k fn(rows[k:k+c], k, *others), each chunk recomputed in backward instead of stored."""
    if chunk_size is None or chunk_size >= rows.shape[0]:
        return fn(rows, 0, *others)
    total = rows.new_zeros(())
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(fn, chunk, start, *others, use_reentrant=False)
    return total


def _cross_entropy_rows(
    rows: torch.Tensor, start: int, columns: torch.Tensor, scale: torch.Tensor, offset: int
) -> torch.Tensor:
    """Summed CE of rows against all columns, row i's positive being column offset + start + i."""
    labels = torch.arange(rows.shape[0], device=rows.device) + offset + start
    return F.cross_entropy(scale * rows @ columns.T, labels, reduction="sum")


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP). Features [b, D] L2-normalised; logit_scale is the exp'd scale.

    Distributed: open_clip's --local-loss --gather-with-grad, memory O(b * B) per process.
    """
    image, text = image_features.float(), text_features.float()
    sizes = local_sizes(image.shape[0], image.device)
    all_image, all_text = all_gather_with_grad(image, sizes), all_gather_with_grad(text, sizes)
    scale, offset, local = logit_scale.float(), sum(sizes[: rank()]), image.shape[0]
    image_to_text = _sum_over_row_chunks(_cross_entropy_rows, image, all_text, scale, offset, chunk_size=chunk_size)
    text_to_image = _sum_over_row_chunks(_cross_entropy_rows, text, all_image, scale, offset, chunk_size=chunk_size)
    return (image_to_text + text_to_image) / (2 * local)


def _sigmoid_rows(
    rows: torch.Tensor, start: int, columns: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positives: bool
) -> torch.Tensor:
    """-sum log sigmoid(z * logits) over rows x columns; z = +1 where row start+i meets column i (if positives)."""
    logits = scale * rows @ columns.T + bias
    signs = -torch.ones_like(logits)
    if positives:
        index = torch.arange(rows.shape[0], device=rows.device)
        signs[index, index + start] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(z_ij * (t x_i.y_j + b)) / b, z = +1 on the diagonal.

    Distributed: the paper's chunked algorithm. Image features stay put; text blocks travel around the
    ring of processes, each adding a negatives-only term, so memory per process is O(b^2).
    """
    image, text = image_features.float(), text_features.float()
    scale, bias = logit_scale.float(), logit_bias.float()
    total = _sum_over_row_chunks(_sigmoid_rows, image, text, scale, bias, True, chunk_size=chunk_size)
    block = text
    for _ in range(world_size() - 1):
        block = ring_shift(block)
        total = total + _sum_over_row_chunks(_sigmoid_rows, image, block, scale, bias, False, chunk_size=chunk_size)
    return total / image.shape[0]
