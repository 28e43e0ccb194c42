"""AdamW with decay only on weight matrices, and a linear warm-up then cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.config import ConfigError

# Parameters that never decay: biases, norms, embeddings, position tables, learned scalars, probes.
NO_DECAY_NAMES = ("bias", "norm", "ln_", "embedding", "pos_embed", "logit_scale", "logit_bias", "probe")


def _scale_of(name: str, lr_scales: dict[str, float]) -> float:
    """The multiplier of the longest prefix of `name` in `lr_scales` (1 when none matches)."""
    matches = [prefix for prefix in lr_scales if name.startswith(prefix)]
    return lr_scales[max(matches, key=len)] if matches else 1.0


def parameter_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight matrices decay, the rest not; parameters whose names start with a prefix of `lr_scales` get
    that multiple of the learning rate (a detector's text tower at 1/100 of the image side's), kept in
    each group's `lr_scale`."""
    names = [name for name, _ in model.named_parameters()]
    unused = [prefix for prefix in lr_scales or {} if not any(name.startswith(prefix) for name in names)]
    if unused:
        tops = sorted({name.split(".")[0] for name in names})
        raise ConfigError(f"config key 'train.lr_scales': {', '.join(map(repr, unused))} is the start of no parameter's "
                          f"name (they start with {', '.join(tops)})")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES))
        groups.setdefault((decays, _scale_of(name, lr_scales or {})), []).append(param)
    if not lr_scales:
        groups.setdefault((True, 1.0), [])
        groups.setdefault((False, 1.0), [])
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    groups = parameter_groups(model, weight_decay, lr_scales)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    # The fused kernel updates all parameters in one pass; it exists on CPU and CUDA in current torch.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
