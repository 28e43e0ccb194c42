"""The generic training loop: steps, logging, checkpoints and evaluations. The family's objective returns
named losses (`vlp.train.step` sums and steps them); `vlp.train.setup` builds the run from the family's
recipe; the loop knows nothing else about the model."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.distributed import all_processes_agree, process_group, rank, world_size
from vlp.errors import CheckpointError, ConfigError, TrainingError
from vlp.train.config import RunConfig, find_resume
from vlp.train.evals import due, parse_evals, run_evals
from vlp.train.run_folder import METRICS_FILE, RunFolderInUse, RunLock, replace_earlier_run
from vlp.train.setup import Run, device_for, setup
from vlp.train.state import IntervalMetrics, skipped_totals, write_checkpoint

log = logging.getLogger("vlp.train")


def train(cfg: RunConfig, out: str | Path, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train as `cfg` says, writing checkpoints and metrics under `out`. Returns the last checkpoint.

    Everything that can be checked is checked before anything is written; the run folder is locked
    against a second run while this one writes to it. A new run (no `resume`) into a folder that holds an
    earlier run is refused, unless `overwrite` says to replace that run."""
    out = Path(out)
    with process_group():
        family, model_cfg, objective_cfg = cfg.family_configs()
        cfg.data.check()
        prompt_length = getattr(objective_cfg, "prompt_length", 0)
        if prompt_length >= cfg.tokenizer.context_length - 1:
            raise ConfigError(f"config key 'objective.prompt_length': {prompt_length} prompt tokens leave nothing to learn "
                              f"in a {cfg.tokenizer.context_length}-token text (tokenizer.context_length)")
        world = world_size()
        if cfg.train.batch_size % (world * cfg.train.accum_steps):
            raise ConfigError(
                f"config key 'train.batch_size': {cfg.train.batch_size} does not split into {world} process(es) x "
                f"{cfg.train.accum_steps} accumulation step(s)"
            )
        resume_from = find_resume(out, resume)
        device = device_for(cfg.train.device)
        new_folder = not out.exists()
        lock, refusal = None, None
        try:
            if rank() == 0:
                out.mkdir(parents=True, exist_ok=True)
                try:
                    lock = RunLock(out).acquire()
                except RunFolderInUse as err:
                    refusal = str(err)
                if refusal is None and resume is None:
                    refusal = replace_earlier_run(out, overwrite)
            if not all_processes_agree(refusal is None):
                raise TrainingError(refusal or f"run folder {out} is in use by another vlp run")
            return _loop(setup(cfg, family, model_cfg, objective_cfg, out, resume_from, device), resume_from)
        finally:
            if lock is not None:
                lock.release()
            if new_folder and rank() == 0 and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no empty folder behind


def _loop(run: Run, last: Path | None) -> Path:
    tc, is_main = run.cfg.train, rank() == 0
    metrics_path = run.out / METRICS_FILE
    skipped_steps = run.saved_state.get("skipped_steps", 0)
    nonfinite_in_a_row = 0
    interval = IntervalMetrics(run)
    scheduled = parse_evals(run.cfg.evals, run.family, tc.strategy)
    # Redrawn less often when stderr is a log file rather than a terminal.
    bar = tqdm(total=tc.steps, initial=run.start_step, disable=not (tc.progress and is_main), unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    with (
        metrics_path.open("a") if is_main else contextlib.nullcontext() as metrics_file,
        contextlib.closing(run.batches),  # a WebDataset stream's workers stop with the run, not at a later GC
    ):
        for step in range(run.start_step + 1, tc.steps + 1):
            batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(run.batches).items()}
            result = run.train_step(batch)
            interval.add(result, batch["size"])
            if result.skipped:
                skipped_steps += 1
                nonfinite_in_a_row += 1
                terms = ", ".join(f"{k} {v.item():.4g}" for k, v in result.values.items() if k.endswith("_loss"))
                log.warning("step %d skipped: the loss or the gradient norm is not finite (%s; gradient norm "
                            "%.4g); %d in a row", step, terms, result.grad_norm.item(), nonfinite_in_a_row)
                if nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    before = f"the last checkpoint, written before them, is {last}" if last else "no checkpoint was written"
                    raise TrainingError(
                        f"training diverged: {nonfinite_in_a_row} steps in a row (steps {step - nonfinite_in_a_row + 1}"
                        f" to {step}) had a non-finite loss or gradient norm (train.max_nonfinite_steps) and made no "
                        f"update; {before}. Lower train.lr ({tc.lr:g}) or keep train.grad_clip set"
                    )
            else:
                nonfinite_in_a_row = 0
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                record = interval.record(step)
                if is_main:
                    _write_record(metrics_file, metrics_path, record)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            if step == tc.steps and nonfinite_in_a_row == step - run.start_step:
                raise TrainingError(
                    f"no step of this run made an update: every one (steps {run.start_step + 1} to {step}) had a "
                    "non-finite loss or gradient norm, so no checkpoint was written. Check the objective's settings, "
                    f"or lower train.lr ({tc.lr:g})")
            if step == tc.steps or (step % tc.save_every == 0 and not nonfinite_in_a_row):
                # In a run of skipped steps the model may have diverged: its checkpoint would become
                # `latest` for resuming and evaluation, so it waits for a step that updates again.
                last = write_checkpoint(run, step, skipped_steps=skipped_steps, last=last)
            elif step % tc.save_every == 0:
                log.warning("step %d: no checkpoint while steps are skipped for a non-finite loss", step)
            evaluations = due(scheduled, step, tc.steps)
            if evaluations and not nonfinite_in_a_row:
                results = run_evals(run, evaluations, step)
                if is_main:
                    _write_record(metrics_file, metrics_path, {"step": step, **results})
    bar.close()
    if last is None:
        raise CheckpointError(f"no training steps were run: train.steps is {tc.steps}")
    totals, _ = skipped_totals(run.bad, run.carried_failures)
    if is_main:
        summary = ", ".join(f"{cause} {n}" for cause, n in totals.items()) or "none"
        if run.start_step >= tc.steps:
            log.info("nothing to train: the checkpoint is at step %d, train.steps is %d", run.start_step, tc.steps)
        log.info("run ended at step %d; skipped samples: %s; skipped steps (non-finite loss or gradient): %d",
                 max(run.start_step, tc.steps), summary, skipped_steps)
    return last


def _write_record(metrics_file, path: Path, record: dict) -> None:
    try:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
