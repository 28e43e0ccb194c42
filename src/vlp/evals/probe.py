"""Frozen-feature classification: what a frozen image encoder's features support when only a small head
is trained on them.

- linear probe: logistic regression on the pooled image embedding, standardised (the dual-encoder papers' linear probe);
- attentional probe: a new attentional pooler (one learned query over the encoder's tokens) with a
  LayerNorm and a linear classifier, the frozen-encoder protocol of the captioning-contrastive papers.

Features are computed once by the predict functions; only the heads train, on the cached features.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import NonNegativeFloat, PositiveInt
from vlp.layers import AttentionalPooler


@dataclass
class ProbeConfig:
    steps: PositiveInt = 500  # optimiser steps over shuffled passes of the cached features, whatever their number
    batch_size: PositiveInt = 256
    lr: NonNegativeFloat = 3e-3
    weight_decay: NonNegativeFloat = 1e-4
    heads: PositiveInt = 4  # the attentional probe's pooler; must divide the encoder width
    seed: int = 0


class AttentionalProbe(nn.Module):
    def __init__(self, width: int, num_classes: int, heads: int):
        super().__init__()
        self.pool = AttentionalPooler(width, width, heads, num_queries=1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen tokens [B, N, D] -> class logits [B, C]."""
        return self.head(self.norm(self.pool(tokens)[:, 0]))


def _fit(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, cfg: ProbeConfig) -> nn.Module:
    """Cross-entropy with AdamW and a cosine schedule over `steps` mini-batches of the cached features."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    head.train()
    order, start = torch.randperm(len(features), generator=generator), 0
    for _ in range(cfg.steps):
        if start >= len(features):
            order, start = torch.randperm(len(features), generator=generator), 0
        rows = order[start : start + cfg.batch_size]
        start += cfg.batch_size
        loss = F.cross_entropy(head(features[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def _accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (head(features).argmax(dim=1) == labels).float().mean().item()


def split_train_test(
    paths: Sequence[Path], labels: Sequence[int], test_fraction: float, seed: int = 0
) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """A seeded random split of one labelled set into train and test parts."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction {test_fraction} is not between 0 and 1")
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    cut = round(len(order) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return ([paths[i] for i in train], [labels[i] for i in train], [paths[i] for i in test], [labels[i] for i in test])


def frozen_feature_probes(
    embed_images: Callable[[Sequence[Any]], torch.Tensor],
    embed_image_tokens: Callable[[Sequence[Any]], torch.Tensor],
    train: tuple[Sequence[Any], Sequence[int]],
    test: tuple[Sequence[Any], Sequence[int]],
    num_classes: int,
    cfg: ProbeConfig | None = None,
) -> dict[str, float]:
    """Train both probes on `train` (images, labels) and return their top-1 accuracy on `test`."""
    cfg = cfg or ProbeConfig()
    (train_images, train_labels), (test_images, test_labels) = train, test
    y_train, y_test = torch.tensor(list(train_labels)), torch.tensor(list(test_labels))
    torch.manual_seed(cfg.seed)
    metrics = {}
    pooled_train, pooled_test = embed_images(train_images).float(), embed_images(test_images).float()
    # Standardised with the training statistics: unit-norm embeddings would need far larger weights.
    mean, std = pooled_train.mean(dim=0), pooled_train.std(dim=0).clamp_min(1e-6)
    pooled_train, pooled_test = (pooled_train - mean) / std, (pooled_test - mean) / std
    linear = _fit(nn.Linear(pooled_train.shape[1], num_classes), pooled_train, y_train, cfg)
    metrics["linear_acc1"] = _accuracy(linear, pooled_test, y_test)
    tokens_train, tokens_test = embed_image_tokens(train_images).float(), embed_image_tokens(test_images).float()
    if tokens_train.shape[2] % cfg.heads:
        raise ValueError(f"probe heads {cfg.heads} do not divide the encoder width {tokens_train.shape[2]}")
    attentional = _fit(AttentionalProbe(tokens_train.shape[2], num_classes, cfg.heads), tokens_train, y_train, cfg)
    metrics["attentional_acc1"] = _accuracy(attentional, tokens_test, y_test)
    return metrics
