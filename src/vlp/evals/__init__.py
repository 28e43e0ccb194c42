"""Evaluation tasks. Each receives predict functions and returns named metrics."""

from collections.abc import Callable, Sequence

import torch

# A predict function: a batch of inputs (images or texts) -> embeddings [N, E].
EmbedFn = Callable[[Sequence], torch.Tensor]
