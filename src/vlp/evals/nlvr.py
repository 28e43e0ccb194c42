"""NLVR2-style accuracy: is each statement about an image pair judged true or false correctly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.data.nlvr import read_nlvr


def evaluate_nlvr(
    true_probability: Callable[[Sequence[Path], Sequence[Path], Sequence[str]], torch.Tensor],
    data: str | Path,
    images_dir: str | Path | None = None,
) -> dict[str, Any]:
    items = read_nlvr(data, images_dir)
    probability = true_probability([i.left for i in items], [i.right for i in items], [i.sentence for i in items])
    labels = torch.tensor([i.label for i in items])
    predicted = probability >= 0.5
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    return {
        "task": "nlvr",
        "dataset": str(data),
        "metrics": {"accuracy": (predicted == labels).float().mean().item(), "majority_baseline": majority},
    }
