"""Instruction task suites (the instruction-tuning evaluation, spec §7.5 and §7.10): every task of a suite scored with
its own metric, open tasks by generation and closed ones by ranking their candidate answers.

A suite is a `tasks.json` ({"tasks": {name: {"file", "method", "metric", "split", "category", "dense"}}}, as
`vlp data instructions` writes it) over instruction record files whose instructions are written out, or VisDial
v1.0 dialog files (with `dense`: VisDial's dense annotations file, for NDCG). Metrics:

- cider: COCO caption evaluation (pycocoevalcap, PTB tokeniser) against the record's `answers`;
- vqa_accuracy: the official VQA accuracy (`vlp.evals.vqa`, 2021 revision) against the `answers`;
- exact_match: the VQA-normalised answer equals one of the `answers` (or the `answer`);
- accuracy: the best-scoring candidate is the right one (closed tasks, by ranking);
- mrr: visual dialog's retrieval metrics as the official VisDial v1.0 evaluation defines them
  (visdial-challenge-starter-pytorch, `visdialch/metrics.py`: `scores_to_ranks`, `SparseGTMetrics`, `NDCG`):
  R@1, R@5, R@10, mean rank and MRR of the right candidate, candidates tied in score ranked by their index;
  NDCG over the rounds whose records carry dense `relevance`, cut at the number of relevant candidates.

Ranking scores each candidate by its summed log-likelihood as the answer (no length normalisation, as
LAVIS's `predict_class`); a candidate with verbalizers (["yes", "true"]) scores as its best word.
"""

from __future__ import annotations

import json
import math
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
        if "dense" in task:
            task["dense"] = str(path.parent / task["dense"])
    return tasks


def _references(record: InstructionRecord) -> list[str]:
    return record.answers or [record.answer]


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


def candidate_ranks(row: Sequence[float]) -> list[int]:
    """The 1-based rank of each candidate by descending score, ties by index (VisDial's `scores_to_ranks`
    with a stable sort)."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    ranks = [0] * len(row)
    for position, index in enumerate(order, start=1):
        ranks[index] = position
    return ranks


def ranked_metrics(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> dict[str, float]:
    """VisDial's sparse metrics of the right candidates: R@1 (accuracy), R@5, R@10, mean rank and MRR."""
    ranks = [candidate_ranks(row)[label] for row, label in zip(scores, labels, strict=True)]
    n = len(ranks)
    return {"accuracy": sum(r == 1 for r in ranks) / n, "r@5": sum(r <= 5 for r in ranks) / n,
            "r@10": sum(r <= 10 for r in ranks) / n, "mean_rank": sum(ranks) / n, "mrr": sum(1 / r for r in ranks) / n}


def ndcg(scores: Sequence[Sequence[float]], relevance: Sequence[Sequence[float]]) -> float:
    """VisDial's NDCG: per round, DCG of the candidates in predicted order over that of the ideal order, both
    cut at the number of candidates with non-zero relevance; averaged over rounds."""
    values = []
    for row, gains in zip(scores, relevance, strict=True):
        if len(gains) != len(row):
            raise DataError(f"{len(gains)} relevance values for {len(row)} candidates")
        k = sum(g != 0 for g in gains)
        if k == 0:
            continue
        ranks = candidate_ranks(row)
        predicted = sorted(range(len(row)), key=ranks.__getitem__)[:k]
        ideal = sorted(gains, reverse=True)[:k]
        dcg = sum(gains[i] / math.log2(position + 2) for position, i in enumerate(predicted))
        best = sum(g / math.log2(position + 2) for position, g in enumerate(ideal))
        values.append(dcg / best)
    return sum(values) / len(values) if values else float("nan")


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
        if metric != "mrr":
            return {"accuracy": ranked["accuracy"]}
        out = {"mrr": ranked["mrr"], "r@1": ranked["accuracy"], "r@5": ranked["r@5"], "r@10": ranked["r@10"],
               "mean_rank": ranked["mean_rank"]}
        dense = [(row, r.relevance) for row, r in zip(scores, records, strict=True) if r.relevance is not None]
        if dense:
            out["ndcg"] = ndcg([row for row, _ in dense], [gains for _, gains in dense])
        return out
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
