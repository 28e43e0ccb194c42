"""Teacher-forced sequence likelihood: next-token targets and per-sequence negative log-likelihood. Losses
train with them and predictors rank candidate answers with them; no process-group code here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_targets(text: torch.Tensor, text_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """Targets [B, L - 1] of teacher forcing: token i + 1 for position i; -100 (ignored) for padding and
    the first `prompt_length` predicted tokens."""
    targets = text[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    targets[:, :prompt_length] = -100
    return targets


def sequence_losses(
    logits: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-sequence summed next-token cross-entropy [B] (the negative log-likelihood when not smoothed)."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        next_token_targets(text, text_mask),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return per_token.sum(dim=1)
