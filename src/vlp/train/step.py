"""One optimiser step: forward and backward (over micro-batches when accumulating), gradient clipping, the
optimiser, the schedule and the objective's after-step hook. The trainer and the benchmarks run it."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from vlp.config import ConfigError
from vlp.distributed import ParallelModel, all_processes_agree
from vlp.precision import Precision, resolve_precision


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut a batch into `parts` micro-batches along the sample dimension."""
    tensors = {k: v.tensor_split(parts) for k, v in batch.items() if torch.is_tensor(v)}
    micro = []
    for i in range(parts):
        part = {k: v[i] for k, v in tensors.items()}
        part["size"] = len(next(iter(part.values())))
        micro.append(part)
    return micro


def total_loss(values: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    losses = {k: v for k, v in values.items() if k.endswith("_loss")}
    if not losses:
        raise RuntimeError(f"{family} objective returned no '*_loss' value: {sorted(values)}")
    return sum(losses.values())


def accumulated_backward(
    objective: Any, micro_batches: list[dict[str, Any]], *, no_sync: Any, autocast: Any, family: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step's gradients from k micro-batches, the loss seeing all of them (open_clip's
    --accum-freq): features of every micro-batch are computed without gradient, then each micro-batch
    is recomputed with gradient and its fresh features replace its cached ones in the full loss.

    Model-level scalars (the logit scale and bias) take their gradient from the last pass only, so
    they are not counted k times. `no_sync` suspends gradient reduction until that last pass.
    """
    with torch.no_grad(), autocast:
        cached = [objective.embed(m) for m in micro_batches]
    last = len(micro_batches) - 1
    for j, micro in enumerate(micro_batches):
        with no_sync() if j < last else contextlib.nullcontext(), autocast:
            fresh = objective.embed(micro)
            merged: dict[str, torch.Tensor | None] = {}
            for key, value in fresh.items():
                if value is None or value.dim() == 0:
                    merged[key] = value if value is None or j == last else value.detach()
                else:
                    merged[key] = torch.cat([value if i == j else c[key] for i, c in enumerate(cached)])
            values = objective.losses(merged)
            loss = total_loss(values, family)
        loss.backward()
    return loss, values


@dataclass
class StepResult:
    loss: torch.Tensor
    values: dict[str, torch.Tensor]  # the objective's named values
    grad_norm: torch.Tensor  # before clipping
    skipped: bool  # the loss or the gradient norm was not finite: no update was made


class TrainStep:
    """One optimiser step on one batch: forward and backward (over micro-batches when accumulating),
    gradient clipping, the optimiser, the schedule and the objective's after-step hook. The trainer
    and the benchmarks run the same step.

    A step whose loss or gradient norm is not finite on any process makes no update (the schedule still
    advances, so the run stays on its step count); the caller counts such steps."""

    def __init__(
        self,
        parallel: ParallelModel,
        objective: Any,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        accum_steps: int = 1,
        grad_clip: float | None = None,
        precision: Precision = "auto",
        device_type: str = "cpu",
        family: str = "model",
    ):
        if accum_steps > 1 and not objective.accumulates:
            raise ConfigError(f"config key 'train.accum_steps': the {family} objective cannot accumulate yet")
        self.parallel, self.objective, self.optimizer, self.schedule = parallel, objective, optimizer, schedule
        self.accum_steps, self.grad_clip, self.family = accum_steps, grad_clip, family
        self.precision = resolve_precision(precision, device_type)
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, batch: dict[str, Any]) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.accum_steps > 1:
            loss, values = accumulated_backward(
                self.objective, split_batch(batch, self.accum_steps), no_sync=self.parallel.no_sync,
                autocast=self.autocast, family=self.family,
            )
        else:
            with self.autocast:
                values = self.objective(batch)
            loss = total_loss(values, self.family)
            loss.backward()
        self.parallel.sync_gradients()
        # The total norm is always measured (an infinite threshold leaves the gradients as they are): it decides
        # whether the step is taken.
        grad_norm = self.parallel.clip_grad_norm(self.grad_clip or math.inf)
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        skipped = not all_processes_agree(finite)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if not skipped:
            self.objective.after_step()
        return StepResult(loss, values, grad_norm, skipped)
