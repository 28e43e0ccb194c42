"""Loss functions as pure math on features and logits. Objectives pick, weight and name them.

All losses compute in fp32 whatever the autocast dtype of the features. Under a process group each
process passes its local batch and gets the loss of its own rows against the global batch; the mean
of those over processes is the single-process loss of the global batch, and with DDP's gradient
averaging the gradients are exact. `group` is the process group the batch spans (None: every process);
the collectives live in `vlp.distributed`.

`chunk_size` bounds memory: rows are processed `chunk_size` at a time and recomputed in the backward
pass, so no [b, B] logit matrix is ever held whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from vlp.distributed import Group, all_gather_with_grad, all_reduce_mean, local_sizes, rank, ring_shift, world_size
from vlp.geometry import box_cxcywh_to_xyxy, generalized_box_iou
from vlp.likelihood import next_token_targets, sequence_losses


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
    group: Group = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP). Features [b, D] L2-normalised; logit_scale is the exp'd scale.

    Distributed: open_clip's --local-loss --gather-with-grad, memory O(b * B) per process.
    """
    image, text = image_features.float(), text_features.float()
    sizes = local_sizes(image.shape[0], image.device, group)
    all_image, all_text = all_gather_with_grad(image, sizes, group), all_gather_with_grad(text, sizes, group)
    scale, offset, local = logit_scale.float(), sum(sizes[: rank(group)]), image.shape[0]
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
    group: Group = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(z_ij * (t x_i.y_j + b)) / b, z = +1 on the diagonal.

    Distributed: the paper's chunked algorithm. Image features stay put; text blocks travel around the
    ring of processes, each adding a negatives-only term, so memory per process is O(b^2).
    """
    image, text = image_features.float(), text_features.float()
    scale, bias = logit_scale.float(), logit_bias.float()
    total = _sum_over_row_chunks(_sigmoid_rows, image, text, scale, bias, True, chunk_size=chunk_size)
    block = text
    for _ in range(world_size(group) - 1):
        block = ring_shift(block, group)
        total = total + _sum_over_row_chunks(_sigmoid_rows, image, block, scale, bias, False, chunk_size=chunk_size)
    return total / image.shape[0]


def momentum_distilled_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: torch.Tensor,
    image_momentum: torch.Tensor,
    text_momentum: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    *,
    alpha: float,
    sizes: list[int] | None = None,
    group: Group = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's ITC with momentum distillation: each process's features [b, E] against the momentum
    features of the global batch and the queues [Q, E], with targets mixing alpha x the momentum
    encoders' own softmax and (1 - alpha) x the one-hot positives.

    Returns (loss, the global batch's momentum image and text features [B, E], for the queues). `sizes`
    (every process's batch size, `distributed.local_sizes`) saves a collective when the caller has them."""
    sizes = sizes or local_sizes(image_features.shape[0], image_features.device, group)
    offset = sum(sizes[: rank(group)])
    with torch.no_grad():
        image_m = all_gather_with_grad(image_momentum, sizes, group)
        text_m = all_gather_with_grad(text_momentum, sizes, group)
        image_columns = torch.cat([image_m, image_queue])  # [B + Q, E]
        text_columns = torch.cat([text_m, text_queue])
        scale = 1 / temperature.detach()
        local_m = slice(offset, offset + image_features.shape[0])
        one_hot = F.one_hot(
            torch.arange(local_m.start, local_m.stop, device=image_m.device), image_columns.shape[0]
        ).float()
        image_targets = alpha * (scale * image_m[local_m] @ text_columns.T).softmax(1) + (1 - alpha) * one_hot
        text_targets = alpha * (scale * text_m[local_m] @ image_columns.T).softmax(1) + (1 - alpha) * one_hot
    image_logits = (image_features.float() @ text_columns.T) / temperature
    text_logits = (text_features.float() @ image_columns.T) / temperature
    image_to_text = -(image_logits.log_softmax(1) * image_targets).sum(1).mean()
    text_to_image = -(text_logits.log_softmax(1) * text_targets).sum(1).mean()
    return (image_to_text + text_to_image) / 2, image_m, text_m


def query_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text similarity [I, T]: the best of each image's query features [I, Q, E] against
    each text feature [T, E]."""
    return torch.einsum("iqe,te->itq", image_features.float(), text_features.float()).amax(dim=-1)


def max_query_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    sizes: list[int] | None = None,
    group: Group = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP-2's ITC: per-query image features [b, Q, E] and text features [b, E] (L2-normalised) against
    the global batch, similarity the best query's, divided by the temperature; symmetric cross-entropy
    with label smoothing. Returns (loss, image-to-text [b, B] and text-to-image [b, B] logits, detached:
    ITM samples its hard negatives from them). `sizes` as for `momentum_distilled_contrastive_loss`."""
    sizes = sizes or local_sizes(image_features.shape[0], image_features.device, group)
    offset = sum(sizes[: rank(group)])
    all_image = all_gather_with_grad(image_features.float(), sizes, group)
    all_text = all_gather_with_grad(text_features.float(), sizes, group)
    image_to_text = query_similarity(image_features, all_text) / temperature.float()
    text_to_image = query_similarity(all_image, text_features).T / temperature.float()
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = (F.cross_entropy(image_to_text, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(text_to_image, labels, label_smoothing=label_smoothing)) / 2
    return loss, image_to_text.detach(), text_to_image.detach()


def sample_negatives(
    similarity: torch.Tensor, offset: int, hard: bool, generator: torch.Generator | None = None, *,
    floor: float = 1e-4, exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """One column per row of `similarity` [b, B] (logits: similarity / temperature), never row i's
    positive column offset + i nor a column `exclude` [b, B] marks: drawn with probability
    softmax(similarity) + floor (hard) or uniformly. BLIP's floor of 1e-4 makes no column impossible;
    BLIP-2 samples from the softmax alone (floor 0). A row whose every other column is excluded draws
    among them all: such a batch has no true negative left to give it."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    weights = similarity.float().softmax(dim=1) + floor if hard else torch.ones_like(similarity, dtype=torch.float)
    allowed = torch.ones_like(weights, dtype=torch.bool)
    allowed[rows, rows + offset] = False
    if exclude is not None:
        kept = allowed & ~exclude
        allowed = torch.where(kept.any(dim=1, keepdim=True), kept, allowed)
    return torch.multinomial(weights * allowed, 1, generator=generator).squeeze(1)


def identical_texts(text: torch.Tensor, all_text: torch.Tensor) -> torch.Tensor:
    """[b, B]: whether local text i has the same token ids as global text j. Such a pair is no negative
    (an image whose caption reads the same matches the text), which BLIP's retrieval fine-tuning and
    BLIP-2 rule out by image id; captions repeat often on small or templated data."""
    return (text[:, None, :] == all_text[None, :, :]).all(dim=2)


@torch.no_grad()
def itm_negatives(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: torch.Tensor,
    *,
    hard: bool,
    exclude: torch.Tensor | None = None,
    sizes: list[int] | None = None,
    group: Group = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM negatives among the global batch: for every text an image, for every image a text,
    drawn by softmax(ITC similarity / temperature) as BLIP samples them (hard) or uniformly, never the
    positive nor a pair `exclude` [b, B] marks (`identical_texts`). Returns global row indices (negative
    images [b], negative texts [b]). `sizes` as for `momentum_distilled_contrastive_loss`."""
    sizes = sizes or local_sizes(image_features.shape[0], image_features.device, group)
    offset = sum(sizes[: rank(group)])
    image_to_text = image_features @ all_gather_with_grad(text_features.detach(), sizes, group).T / temperature
    text_to_image = text_features @ all_gather_with_grad(image_features.detach(), sizes, group).T / temperature
    return (sample_negatives(text_to_image, offset, hard, exclude=exclude),
            sample_negatives(image_to_text, offset, hard, exclude=exclude))


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) of logits [N, C] against labels [N] (ITM, NLVR2's true / false head)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss, (logits.argmax(dim=1) == labels).float().mean()


def itm_loss(logits: torch.Tensor, positives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) of match logits [N, 2] whose first `positives` rows are matching pairs
    and the rest negatives."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:positives] = 1
    return classification_loss(logits, labels)


def lm_loss(
    logits: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    prompt_length: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy: position i predicts token i + 1; padding and the first
    `prompt_length` predicted tokens are ignored. logits [B, L, V], text and mask [B, L]."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        next_token_targets(text, text_mask, prompt_length),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def token_mean_loss(sequence_loss: torch.Tensor, tokens: torch.Tensor, *, group: Group = None) -> torch.Tensor:
    """The token mean over the global batch of per-sequence summed losses [b] with their token counts [b]:
    each process divides its sum by the mean token count per process, so that DDP's gradient averaging
    gives the global mean exactly (CoCa's captioning loss)."""
    tokens_per_process = all_reduce_mean(tokens.sum().float(), group)
    return sequence_loss.sum() / tokens_per_process.clamp(min=1)


def weighted_answer_loss(
    logits: torch.Tensor,
    answers: torch.Tensor,
    answer_mask: torch.Tensor,
    weights: torch.Tensor,
    questions: int,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """BLIP's VQA loss: every answer's summed token loss (logits [A, La, V]) weighted by the share of
    annotators who gave it (weights [A]), summed, divided by the number of questions."""
    losses = sequence_losses(logits, answers, answer_mask, label_smoothing=label_smoothing)
    return (weights * losses).sum() / questions


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal sigmoid cross-entropy (Lin et al.):
    CE(p, y) * (1 - p_t)^gamma * (alpha y + (1 - alpha)(1 - y)), p_t the probability of the true label."""
    logits, targets = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


def focal_matching_cost(logits: torch.Tensor, *, alpha: float, gamma: float) -> torch.Tensor:
    """Per prediction and query [P, Q], the focal cost of calling it positive minus that of negative
    (Deformable DETR's matching cost): low where the prediction scores the query high."""
    p = logits.float().sigmoid()
    positive = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
    negative = (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
    return positive - negative


def detection_matching_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_boxes: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """OWL-ViT's matching cost [P, M] of one image: predictions (logits [P, Q], cxcywh boxes [P, 4]) against
    targets (multi-hot labels [M, Q], cxcywh boxes [M, 4]). The class cost sums the focal cost over a
    target's labels; the L1 cost is on cxcywh (the loss's is on corners); the GIoU cost is -GIoU."""
    class_cost = focal_matching_cost(logits, alpha=alpha, gamma=gamma) @ target_labels.float().T
    l1_cost = torch.cdist(pred_boxes.float(), target_boxes.float(), p=1)
    giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes.float()), box_cxcywh_to_xyxy(target_boxes.float()))
    cost = weights[0] * class_cost + weights[1] * l1_cost + weights[2] * giou_cost
    # A non-finite cost (a degenerate box) must not break the solver: it becomes the worst cost there is.
    finite = torch.isfinite(cost)
    worst = cost[finite].max() if finite.any() else cost.new_tensor(0.0)
    return torch.where(finite, cost, worst + 1)


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of least total cost of a [P, M] cost matrix (P >= M): (prediction indices, target
    indices), both [min(P, M)], by scipy's exact solver."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def detection_losses(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_boxes: torch.Tensor,
    box_mask: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    cost_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """OWL-ViT's set losses, averaged over the batch of per-image losses.

    logits [B, P, Q] of every prediction against the image's queries (query_mask [B, Q] marks the real
    ones); pred_boxes [B, P, 4] cxcywh; targets: multi-hot labels [B, M, Q], cxcywh boxes [B, M, 4],
    box_mask [B, M] the real instances. Each image is matched on its own (Hungarian, no gradient); the
    focal loss runs over all predictions x real queries, unmatched predictions being negatives for every
    query, and is divided by the image's count of positive (instance, label) pairs; L1 (on corners) and
    1 - GIoU over matched pairs are divided by the image's count of boxes (scenic's per-example
    normalisation, which its per-example gradient clipping goes with)."""
    logits, pred_boxes = logits.float(), pred_boxes.float()
    batch = logits.shape[0]
    class_terms, l1_terms, giou_terms = [], [], []
    for b in range(batch):
        real = box_mask[b].nonzero().squeeze(1)
        labels = target_labels[b, real].float() * query_mask[b].float()  # [M, Q]
        boxes = target_boxes[b, real].float()
        targets = torch.zeros_like(logits[b])  # [P, Q]: unmatched predictions are negatives for every query
        if len(real):
            with torch.no_grad():
                cost = detection_matching_cost(logits[b], pred_boxes[b], labels, boxes, alpha=alpha, gamma=gamma,
                                               weights=cost_weights)
            rows, cols = hungarian_match(cost)
            rows, cols = rows.to(logits.device), cols.to(logits.device)
            targets[rows] = labels[cols]
            matched_pred = box_cxcywh_to_xyxy(pred_boxes[b, rows])
            matched_true = box_cxcywh_to_xyxy(boxes[cols])
            l1_terms.append((matched_pred - matched_true).abs().sum() / len(real))
            giou_terms.append((1 - generalized_box_iou(matched_pred, matched_true).diagonal()).sum() / len(real))
        else:
            l1_terms.append(pred_boxes.new_zeros(()))
            giou_terms.append(pred_boxes.new_zeros(()))
        focal = sigmoid_focal_loss(logits[b], targets, alpha=alpha, gamma=gamma) * query_mask[b].float()
        class_terms.append(focal.sum() / labels.sum().clamp(min=1))
    return {
        "class_loss": torch.stack(class_terms).mean(),
        "box_l1_loss": torch.stack(l1_terms).mean(),
        "giou_loss": torch.stack(giou_terms).mean(),
    }


def objectness_loss(objectness_logits: torch.Tensor, class_logits: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """OWLv2's objectness target [unpublished; the paper's sentence read literally]: each token learns the
    classification score it ends up with, max over the image's real queries of sigmoid(logit), taken
    without gradient; a sigmoid cross-entropy with that soft target, averaged over tokens and images."""
    with torch.no_grad():
        masked = class_logits.float().masked_fill(~query_mask[:, None, :].bool(), float("-inf"))
        target = masked.amax(dim=-1).sigmoid().nan_to_num(0.0)  # [B, P]; an image without queries: 0
    return F.binary_cross_entropy_with_logits(objectness_logits.float(), target)
