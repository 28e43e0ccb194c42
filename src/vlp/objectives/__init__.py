"""Objectives: a family's model and the losses of `vlp.losses` -> named losses. Each subclasses `Objective`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Objective:
    """What the trainer calls. `__call__(batch)` returns named values, the `*_loss` ones summed into the
    loss; the hooks default to doing nothing."""

    # True when the objective comes in halves, `embed(batch)` (per-sample features and 0-dim scalars) and
    # `losses(embedded)`, so that gradient accumulation can keep every micro-batch's features as negatives.
    accumulates = False

    def __init__(self, model: nn.Module, cfg: Any):
        """`model` is the family's model, or the DDP / compile wrapper that forward passes go through."""
        self.model = model
        self.cfg = cfg

    @staticmethod
    def prepare(model: nn.Module, cfg: Any) -> None:
        """Called once before the model is wrapped for data parallelism (to freeze what no term uses)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimiser step that updated the model (to clamp learned scales)."""
