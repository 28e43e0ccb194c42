"""Instruction following (visual dialog included): an instruction about one image or several, answered in
the model's words; evaluated over a task suite (`vlp data instructions` writes the shapes world's), every task
by its own metric (`vlp.evals.instructions`), open tasks generated and closed ones ranked. Trained on
instruction records from a mixture of task formats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlp.abilities import AnswersQuestions, FollowsInstructions
from vlp.config import PositiveInt
from vlp.data.instruction_batches import INSTRUCTION_RECORDS
from vlp.data.instructions import read_instructions
from vlp.errors import DataError
from vlp.evals.instructions import read_suite, score_task
from vlp.flags import option
from vlp.generation import GenerationConfig
from vlp.tasks.base import EvalResult, Evaluation, PredictFunction, Predictor, Task
from vlp.tasks.vqa import VqaPredictor

PROTOCOL = ("open tasks generated, closed tasks ranked by summed log-likelihood (LAVIS predict_class); CIDEr by "
            "pycocoevalcap (PTB), VQA accuracy by the official 2021 revision, visual dialog by VisDial v1.0's metrics "
            "(visdialch/metrics.py: ties ranked by index)")


@dataclass
class InstructRequest:
    """Instructions, each about an image or a list of images read in order."""

    images: list[Any] = option(help="image files (or lists of them), one per instruction", image=True)
    instructions: list[str] = option(help="the instructions, written out")


@dataclass
class InstructResponse:
    answers: list[str]


def instruct(functions: Any, request: InstructRequest) -> InstructResponse:
    """Each instruction given as written: to a model that follows instructions, its image side reads it too."""
    follow = functions.follow_instructions or functions.require("answer")
    return InstructResponse(follow(request.images, request.instructions))


@dataclass
class InstructionsEvalConfig:
    tasks: str = option(help="the suite's tasks.json (vlp data instructions)")
    task: list[str] = option(default_factory=list, repeat=True, help="evaluate this task (repeatable; default: all)")
    split: Literal["held_in", "held_out"] | None = option(None, help="only the tasks of this split")
    limit: PositiveInt | None = option(None, help="at most this many records per task")
    beams: PositiveInt = option(3, help="beam width of generated answers (1: greedy)")
    max_new_tokens: PositiveInt = option(20, help="longest generated answer, in tokens")
    question_template: str = option("{}", help="how an instruction is put to the model, {} the instruction "
                                    "(default: as written)")


def _options(cfg: InstructionsEvalConfig) -> dict[type[Predictor], dict[str, Any]]:
    generation = GenerationConfig(method="beam" if cfg.beams > 1 else "greedy", num_beams=cfg.beams,
                                  max_new_tokens=cfg.max_new_tokens, min_new_tokens=1)
    return {VqaPredictor: {"generation": generation, "question_template": cfg.question_template}}


def evaluate_instructions(functions: Any, cfg: InstructionsEvalConfig) -> EvalResult:
    """Run the chosen tasks of a suite (all; or those named; or one split, held_in / held_out) with a model's
    `answer` and `score_answers` predict functions; `limit` caps the records per task."""
    answer, score_answers = functions.require("answer"), functions.require("score_answers")
    suite, tasks, split = cfg.tasks, cfg.task, cfg.split
    suite_tasks = read_suite(suite)
    unknown = sorted(set(tasks or ()) - set(suite_tasks))
    if unknown:
        raise DataError(f"{suite} has no task {', '.join(unknown)} (tasks: {', '.join(suite_tasks)})")
    chosen = {name: task for name, task in suite_tasks.items()
              if (not tasks or name in tasks) and (split is None or task.get("split") == split)}
    if not chosen:
        raise DataError(f"{suite}: no task is in split {split!r}")
    metrics: dict[str, float] = {}
    predictions: dict[str, list[Any]] = {}
    primary: dict[str, list[float]] = {}
    for name, task in chosen.items():
        records = read_instructions(task["file"], dense=task.get("dense"))[: cfg.limit]
        unwritten = next((r for r in records if r.instruction is None), None)
        if unwritten is not None:
            raise DataError(f"{task['file']}: evaluation records need their instruction written out (record "
                            f"{unwritten.id or records.index(unwritten)} names template {unwritten.template!r})")
        images = [r.images[0] if len(r.images) == 1 else r.images for r in records]
        instructions = [r.instruction for r in records]
        if task["method"] == "rank":
            if any(r.candidates is None for r in records):
                raise DataError(f"{task['file']}: ranked task '{name}' needs candidates in every record")
            scores = score_answers(images, instructions, [r.candidates for r in records])
            result = score_task(records, task["metric"], scores=scores)
            predictions[name] = [r.candidates[max(range(len(s)), key=s.__getitem__)][0]
                                 for r, s in zip(records, scores, strict=True)]
        else:
            predictions[name] = answer(images, instructions)
            result = score_task(records, task["metric"], predictions=predictions[name])
        metrics.update({f"{name}/{key}": value for key, value in result.items()})
        primary.setdefault(task.get("split", "all"), []).append(next(iter(result.values())))
    for group, values in sorted(primary.items()):
        metrics[f"{group}/mean"] = sum(values) / len(values)
    return EvalResult("instruction_tasks", str(suite), metrics, protocol=PROTOCOL, details={"predictions": predictions})


TASK = Task(
    name="instructions",
    route="instruct",
    abilities=((AnswersQuestions,),),
    functions=(
        PredictFunction("score_answers", VqaPredictor, lambda f, images: f.score_answers(
            images[:3], ["what color?", "how many?", "is it red?"],
            [["red", "blue"], ["one", "two", "three"], [["yes", "true"], ["no", "false"]]])),
        PredictFunction("follow_instructions", VqaPredictor, lambda f, images: f.follow_instructions(
            images[:3], ["describe it.", "count the shapes.", "is it red?"]), (FollowsInstructions,)),
    ),
    request=InstructRequest,
    response=InstructResponse,
    respond=instruct,
    example_request=lambda images: InstructRequest(images[:2], ["describe it.", "is it red?"]),
    evaluation=Evaluation("instructions", "instruction task suites: each task by its metric, open ones generated, "
                          "closed ones ranked", InstructionsEvalConfig, evaluate_instructions, _options),
    training=INSTRUCTION_RECORDS,
)
