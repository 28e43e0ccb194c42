"""Activations and the transformer MLP."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: Activation) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation '{name}'; expected gelu, gelu_tanh or quick_gelu")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, act: Activation = "gelu", out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
