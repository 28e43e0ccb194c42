"""The task table: one module per task, each declaring its abilities, predict functions, typed request and
response, evaluation, commands and training data (`vlp.tasks.base.Task`). A new task is a module and a row
here; the command line and the trainer's evaluations find it in `TASKS`.

`predict_functions(pretrained)` gives every predict function a checkpoint's abilities allow, in one object:
what the command line, the evaluators and CapFilt call, never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlp.checkpoint import Pretrained
from vlp.errors import ConfigError, UnsupportedTask
from vlp.tasks import (
    captioning,
    detection,
    embedding,
    grounding,
    instructions,
    matching,
    nlvr,
    retrieval,
    vqa,
    zeroshot,
)
from vlp.tasks.base import Evaluation, PredictFunction, Predictor, Task

TASKS: tuple[Task, ...] = (
    embedding.TASK,
    zeroshot.TASK,
    retrieval.TASK,
    matching.TASK,
    captioning.TASK,
    vqa.TASK,
    nlvr.TASK,
    instructions.TASK,
    detection.TASK,
    grounding.TASK,
)
FUNCTIONS: dict[str, PredictFunction] = {function.name: function for task in TASKS for function in task.functions}
EVALUATIONS: dict[str, Evaluation] = {task.evaluation.name: task.evaluation for task in TASKS if task.evaluation}


def get_evaluation(name: str) -> Evaluation:
    if name not in EVALUATIONS:
        raise ConfigError(f"unknown evaluation {name!r}; known: {', '.join(EVALUATIONS)}")
    return EVALUATIONS[name]


class PredictFunctions:
    """Every predict function of a checkpoint by name, as attributes: None where its family lacks the
    abilities (`require(name)` gives the function or says why the model cannot). Predictors are made on first
    use, one per predictor class, with the common settings (device, precision, batch size, progress) and
    their own `options` ({PredictorClass: {option: value}})."""

    def __init__(self, pretrained: Pretrained, options: dict[type[Predictor], dict[str, Any]] | None = None,
                 **common: Any):
        self.pretrained = pretrained
        self._options = options or {}
        self._common = common
        self._predictors: dict[type[Predictor], Predictor] = {}

    def available(self, name: str) -> bool:
        return all(self.pretrained.family.can(ability) for ability in FUNCTIONS[name].abilities)

    def predictor(self, cls: type[Predictor]) -> Predictor:
        if cls not in self._predictors:
            self._predictors[cls] = cls(self.pretrained, **{**self._common, **self._options.get(cls, {})})
        return self._predictors[cls]

    def __getattr__(self, name: str) -> Callable[..., Any] | None:
        if name.startswith("_") or name not in FUNCTIONS:
            raise AttributeError(f"no predict function {name!r}")
        if not self.available(name):
            return None
        return getattr(self.predictor(FUNCTIONS[name].predictor), name)

    def require(self, name: str) -> Callable[..., Any]:
        function = getattr(self, name)
        if function is None:
            declared = FUNCTIONS[name]
            missing = [a.__name__ for a in declared.abilities if not self.pretrained.family.can(a)]
            # The predictor's task when the model lacks the predictor's abilities, else the function's own.
            task = declared.predictor.task if declared.predictor.missing_ability(self.pretrained) else \
                name.replace("_", " ")
            raise UnsupportedTask(f"{self.pretrained.path}: {self.pretrained.family.name} models cannot {task} "
                                  f"(its family does not declare {', '.join(missing)})")
        return function


def predict_functions(
    pretrained: Pretrained, *, options: dict[type[Predictor], dict[str, Any]] | None = None, **common: Any
) -> PredictFunctions:
    """The predict functions of a loaded checkpoint. `common` goes to every predictor (device, precision,
    batch_size, progress); `options` to one predictor each (`{CaptionPredictor: {"generation": ...}}`)."""
    return PredictFunctions(pretrained, options, **common)


class GivenFunctions:
    """Predict functions given by hand (a baseline, a model of another library), for the evaluations: the
    named ones as attributes, the others None."""

    def __init__(self, **functions: Callable[..., Any]):
        unknown = sorted(set(functions) - set(FUNCTIONS))
        if unknown:
            raise ValueError(f"no predict function {', '.join(unknown)}; known: {', '.join(FUNCTIONS)}")
        self._functions = functions

    def __getattr__(self, name: str) -> Callable[..., Any] | None:
        if name.startswith("_") or name not in FUNCTIONS:
            raise AttributeError(f"no predict function {name!r}")
        return self._functions.get(name)

    def require(self, name: str) -> Callable[..., Any]:
        function = getattr(self, name)
        if function is None:
            raise UnsupportedTask(f"no {name} predict function was given")
        return function


__all__ = ["EVALUATIONS", "FUNCTIONS", "TASKS", "GivenFunctions", "PredictFunctions", "get_evaluation",
           "predict_functions"]
