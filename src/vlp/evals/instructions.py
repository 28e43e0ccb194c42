"""Instruction task suites (the instruction-tuning evaluation, spec §7.5 and §7.10): every task of a suite scored with
its own metric, open tasks by generation and closed ones by ranking their candidate answers.

A suite is a `tasks.json` ({"tasks": {name: {"file", "method", "metric", "split", "category"}}}, as `vlp data
instructions` writes it) over instruction record files whose instructions are written out. Metrics:

- cider: COCO caption evaluation (pycocoevalcap, PTB tokeniser) against the record's `answers`;
- vqa_accuracy: the official VQA accuracy (`vlp.evals.vqa`, 2021 revision) against the `answers`;
- exact_match: the VQA-normalised answer equals one of the `answers` (or the `answer`);
- accuracy: the best-scoring candidate is the right one (closed tasks, by ranking);
- mrr: the mean reciprocal rank of the right candidate (visual dialog), with R@1 beside it.

Ranking scores each candidate by its summed log-likelihood as the answer (no length normalisation, as
LAVIS's `predict_class`); a candidate with verbalizers (["yes", "true"]) scores as its best word.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlp.data.instructions import InstructionRecord
from vlp.data.sources import DataError
from vlp.data.vqa_answers import normalize_answer
from vlp.evals.captioning import caption_metrics
from vlp.evals.vqa import vqa_accuracy

METRICS = ("cider", "vqa_accuracy", "exact_match", "accuracy", "mrr")


def read_suite(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tasks of a suite file, each checked for the keys the evaluation needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction task suite not found: {path}")
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not an instruction task suite ({{'tasks': {{name: ...}}}}): {err}") from err
    for name, task in tasks.items():
        if not isinstance(task, dict) or not {"file", "method", "metric"} <= set(task):
            raise DataError(f"{path}: task '{name}' needs file, method and metric")
        if task["metric"] not in METRICS:
            raise DataError(f"{path}: task '{name}' has metric {task['metric']!r}; known: {', '.join(METRICS)}")
        if task["method"] not in ("generate", "rank"):
            raise DataError(f"{path}: task '{name}' has method {task['method']!r}; expected generate or rank")
        task["file"] = str(path.parent / task["file"])
    return tasks


def _references(record: InstructionRecord) -> list[str]:
    return record.answers or [record.answer]


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


def ranked_metrics(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy (R@1) and mean reciprocal rank of the right candidates; a tie ranks the right one last."""
    ranks = [1 + sum(s > row[label] or (s == row[label] and i != label) for i, s in enumerate(row))
             for row, label in zip(scores, labels, strict=True)]
    return {"accuracy": sum(r == 1 for r in ranks) / len(ranks), "mrr": sum(1 / r for r in ranks) / len(ranks)}


def score_task(
    records: list[InstructionRecord], metric: str, *, predictions: Sequence[str] | None = None,
    scores: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """A task's metrics from generated `predictions` or candidate `scores`."""
    if scores is not None:
        labels = [r.label for r in records]
        if any(label is None for label in labels):
            raise DataError("a ranked task's records need an answer among their candidates")
        ranked = ranked_metrics(scores, labels)
        return {"mrr": ranked["mrr"], "r@1": ranked["accuracy"]} if metric == "mrr" else {"accuracy": ranked["accuracy"]}
    if predictions is None:
        raise ValueError("give predictions or scores")
    if metric == "cider":
        return {"cider": float(caption_metrics([_references(r) for r in records], list(predictions), meteor=False)["cider"])}
    if metric == "vqa_accuracy":
        values = [vqa_accuracy(p, _references(r)) for p, r in zip(predictions, records, strict=True)]
    elif metric == "exact_match":
        values = [exact_match(p, _references(r)) for p, r in zip(predictions, records, strict=True)]
    else:
        raise DataError(f"metric {metric!r} needs ranked candidates (method rank)")
    return {metric: sum(values) / len(values)}
