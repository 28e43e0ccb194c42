"""Box geometry: conversions, IoU, generalised IoU and non-maximum suppression.

The lowest layer (it imports torch alone), so that a detector loads and predicts without the losses or
any process-group code. Boxes are (cx, cy, w, h) or (x0, y0, x1, y1), in whatever units the caller uses.
"""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU [N, M] of xyxy boxes a [N, 4] and b [M, 4], and their union [N, M]."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU [N, M] of xyxy boxes: IoU - (enclosing area - union) / enclosing area."""
    iou, union = box_iou(a, b)
    top_left = torch.minimum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    enclosing = (bottom_right - top_left).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the xyxy boxes [N, 4] that greedy NMS keeps, best first: a box is dropped when it overlaps
    a better one above `iou`."""
    order = scores.argsort(descending=True)
    keep: list[int] = []
    overlaps = box_iou(boxes, boxes)[0]
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        suppressed |= overlaps[index] > iou
    return torch.tensor(keep, dtype=torch.long)
