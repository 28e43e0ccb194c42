"""Loss functions as pure math on features. Objectives pick and weight them.

All losses compute in fp32 whatever the autocast dtype of the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP). Features [B, D] L2-normalised; logit_scale is the exp'd scale."""
    image_features, text_features = image_features.float(), text_features.float()
    logits_per_image = logit_scale * image_features @ text_features.T  # [B, B]
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(z_ij * (t x_i.y_j + b)) / B, z = +1 on the diagonal."""
    image_features, text_features = image_features.float(), text_features.float()
    logits = logit_scale * image_features @ text_features.T + logit_bias  # [B, B]
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
