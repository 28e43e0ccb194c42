"""What a run records as it goes: the metrics of each log interval, and checkpoints with the state a
resumed run needs (step, configuration, data position, skipped samples and steps)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vlp.checkpoint import CHECKPOINTS_DIR, first_nonfinite, list_checkpoints, save_checkpoint
from vlp.config import to_dict
from vlp.data.sources import CAUSES, BadSamples
from vlp.distributed import all_gather_objects, all_processes_agree, all_reduce_mean, all_reduce_sum, rank, world_size
from vlp.errors import TrainingError
from vlp.train.setup import Run
from vlp.train.step import StepResult


def skipped_totals(bad: BadSamples, carried: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Skipped samples by cause over every process and every resumed leg of the run (collective):
    (all, those that failed to load). Rows dropped when a file is read count once, since every process
    reads the whole file; samples that failed to load are summed over processes and carried across legs."""
    loaded = all_reduce_sum(torch.tensor([bad.failed[c] for c in CAUSES], dtype=torch.float64)).tolist()
    failed = {c: int(n) + carried.get(c, 0) for c, n in zip(CAUSES, loaded, strict=True)}
    failed = {cause: n for cause, n in failed.items() if n}
    totals = {c: bad.dropped[c] + failed.get(c, 0) for c in CAUSES if bad.dropped[c] + failed.get(c, 0)}
    return totals, failed


class IntervalMetrics:
    """The named values of the steps since the last log step, summed on the device (steps do not wait for
    an accelerator); `record` averages them over processes into one metrics.jsonl record (collective)."""

    def __init__(self, run: Run):
        self.run = run
        self.run_start = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.skipped, self.samples, self.start = 0, 0, 0, time.perf_counter()

    def add(self, result: StepResult, samples: int) -> None:
        self.samples += samples * world_size()
        if result.skipped:
            self.skipped += 1
            return
        self.steps += 1
        for key, value in {"loss": result.loss, **result.values, "grad_norm": result.grad_norm}.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().double()

    def record(self, step: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        record: dict[str, Any] = {"step": step, "lr": self.run.schedule.get_last_lr()[0]}
        if self.sums:
            means = all_reduce_mean(torch.stack(list(self.sums.values()))).tolist()
            record.update({k: v / self.steps for k, v in zip(self.sums, means, strict=True)})
        record["samples_per_s"] = self.samples / max(elapsed, 1e-9)
        record["elapsed_s"] = time.perf_counter() - self.run_start
        totals, _ = skipped_totals(self.run.bad, self.run.carried_failures)
        record["skipped_samples"] = sum(totals.values())
        record.update({f"skipped/{cause}": n for cause, n in totals.items()})
        if self.skipped:
            record["skipped_steps"] = self.skipped
        self.reset()
        return record


def write_checkpoint(run: Run, step: int, *, skipped_steps: int, last: Path | None) -> Path:
    """Gather the weights and optimiser state and write checkpoint `step` (collective; one process writes),
    keeping the newest `train.keep_checkpoints`. Weights that are not finite stop the run instead."""
    folder = run.out / CHECKPOINTS_DIR / f"step_{step:08d}"
    weights, optimizer_state = run.parallel.state_dict(), run.parallel.optimizer_state(run.optimizer)
    position = run.batches.position()
    gathered = all_gather_objects(position)
    totals, failed = skipped_totals(run.bad, run.carried_failures)
    state = {"step": step, "run": to_dict(run.cfg), "skipped_samples": totals, "failed_samples": failed,
             "skipped_steps": skipped_steps}
    if position is not None:
        state["data_position"] = gathered
    is_main = rank() == 0
    bad_weight = first_nonfinite(weights) if is_main else None
    if not all_processes_agree(bad_weight is None):
        raise TrainingError(
            f"step {step}: weight '{bad_weight}' is not finite, so no checkpoint was written; the last one is "
            f"{last}. Lower train.lr ({run.cfg.train.lr:g}) or keep train.grad_clip set"
        )
    if not is_main:  # one writer; the others took part in gathering the shards
        return folder
    folder = save_checkpoint(
        folder, family=run.family, model_config=run.model_cfg, model=weights, assets=run.assets, state=state,
        # The random state too: an objective's draws (ITM negatives) and dropout go on where they were.
        optimizer_state={"optimizer": optimizer_state, "schedule": run.schedule.state_dict(),
                         "rng": torch.get_rng_state()},
    )
    for old in list_checkpoints(run.out)[: -run.cfg.train.keep_checkpoints]:
        shutil.rmtree(old)
    return folder
