"""Evaluations during training, as a run config's `evals:` section lists them (big_vision's `config.evals`):

    evals:
      shape:                  # a name of your choosing
        task: zeroshot        # an evaluation of the task table (`vlp eval --help` lists them)
        every: 250            # steps; every evaluation also runs after the last step
        data: data/shapes/zeroshot/shape.csv    # the rest: the evaluation's own settings, as its flags
        classnames: data/shapes/zeroshot/shape_classnames.txt
        templates: data/shapes/zeroshot/templates.txt

Each is checked before any work (its settings, and that the model can do the task). The first process
evaluates the model as it is at that step, through the same predict functions `vlp eval` uses, with the
training's random state set aside so that a run with evaluations trains as one without; metrics.jsonl gets
one record of `eval/<name>/<metric>` values and `OUT/evals/<name>/step_N.json` the whole result.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import torch

from vlp.config import ConfigError, PositiveInt, convert_value, from_dict
from vlp.distributed import barrier, rank
from vlp.outputs import write_text
from vlp.registry import Family
from vlp.tasks import TASKS, get_evaluation, predict_functions
from vlp.tasks.base import Evaluation
from vlp.train.run_folder import EVALS_DIR


@dataclass
class ScheduledEval:
    name: str
    evaluation: Evaluation
    config: Any
    every: int | None  # steps between runs; None: after the last step only


def parse_evals(section: dict[str, Any], family: Family, strategy: str) -> list[ScheduledEval]:
    """The run config's `evals:` section, every entry checked: its task, its settings, that the model can do
    the task and that the run keeps whole weights on the first process."""
    if not isinstance(section, dict):
        raise ConfigError(f"config key 'evals': expected a mapping of names to evaluations, got {section!r}")
    if section and strategy != "ddp":
        raise ConfigError(f"config key 'evals': evaluations during training need train.strategy ddp (the whole "
                          f"model on the first process), not {strategy}")
    out = []
    for name, entry in section.items():
        where = f"evals.{name}"
        if not isinstance(entry, dict) or "task" not in entry:
            raise ConfigError(f"config key '{where}': expected a mapping with 'task' (one of the evaluations: "
                              f"{', '.join(t.evaluation.name for t in TASKS if t.evaluation)})")
        settings = dict(entry)
        try:
            evaluation = get_evaluation(settings.pop("task"))
        except ConfigError as err:
            raise ConfigError(f"config key '{where}.task': {err}") from err
        task = next(t for t in TASKS if t.evaluation is evaluation)
        if not task.can(family):
            needs = " or ".join("+".join(a.__name__ for a in needed) for needed in task.abilities)
            raise ConfigError(f"config key '{where}.task': {family.name} models cannot be evaluated on "
                              f"{evaluation.name} (it needs {needs})")
        every = convert_value(settings.pop("every", None), PositiveInt | None, f"{where}.every")
        out.append(ScheduledEval(name, evaluation, from_dict(evaluation.config, settings, prefix=where), every))
    return out


def due(scheduled: list[ScheduledEval], step: int, last_step: int) -> list[ScheduledEval]:
    return [s for s in scheduled if step == last_step or (s.every is not None and step % s.every == 0)]


def run_evals(run: Any, scheduled: list[ScheduledEval], step: int) -> dict[str, float | None]:
    """Evaluate the model being trained (collective: the first process evaluates, the others wait). Returns
    the metrics to log, by `eval/<name>/<metric>` (empty on the other processes)."""
    logged: dict[str, float | None] = {}
    if rank() == 0:
        modes = {module: module.training for module in run.model.modules()}  # frozen parts may stay in eval mode
        cpu_state, python_state = torch.get_rng_state(), random.getstate()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            for item in scheduled:
                functions = predict_functions(run.pretrained(), options=item.evaluation.options(item.config),
                                              device=str(run.device), precision=run.cfg.train.precision)
                result = item.evaluation.evaluate(functions, item.config)
                logged.update({f"eval/{item.name}/{key}": value for key, value in result.metrics.items()})
                folder = run.out / EVALS_DIR / item.name
                folder.mkdir(parents=True, exist_ok=True)
                write_text(folder / f"step_{step:08d}.json", json.dumps(result.to_dict(), indent=1))
        finally:
            for module, training in modes.items():
                module.training = training
            torch.set_rng_state(cpu_state)
            random.setstate(python_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
    barrier()
    return logged
