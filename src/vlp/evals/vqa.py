"""VQA accuracy exactly as the official VQA evaluation computes it.

The official code is GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`. Its
normalisation changed over the years; vlp follows one revision of it at a time, by name:

- "2021" (the default): the latest revision, a013f00 of 2021-03-11 ("Fixed processing answers bug").
  Answers are stripped of tabs, newlines and outer spaces. Only when the annotators disagree are both
  their answers and the prediction normalised (punctuation, number words to digits, articles dropped,
  apostrophe-less contractions restored); when all annotators agree, the prediction must equal their
  answer as written.
- "2016": revision 458a8b2 of 2016-10-08, which LAVIS copied: the prediction is always
  normalised; the annotators' answers only lose their punctuation, and only when they disagree.

Both use the same punctuation list (which has `{ } - !` and not `:` or `'`) and the same hand-written
contractions table, reproduced below as published, quirks included ("somebody'd" maps to "somebodyd";
the capitalised keys never match lower-cased text).

A prediction scores min(#other annotators who gave it / 3, 1), averaged over the ten ways of leaving one
of the ten annotators out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vlp.data.sources import DataError
from vlp.data.vqa import VqaQuestion, annotation_answers
from vlp.data.vqa_answers import clean_answer, normalize_answer, process_punctuation

OfficialVersion = Literal["2021", "2016"]

def vqa_accuracy(prediction: str, answers: Sequence[str], version: OfficialVersion = "2021") -> float:
    """One question's accuracy in [0, 1] against its annotators' answers (ten in VQAv2), as the named
    revision of the official code computes it (see the module docstring)."""
    if version == "2021":
        truth = [clean_answer(a) for a in answers]
        predicted = clean_answer(prediction)
        if len(set(truth)) > 1:
            truth = [normalize_answer(a) for a in truth]
            predicted = normalize_answer(predicted)
    elif version == "2016":
        predicted = normalize_answer(prediction)
        truth = list(answers) if len(set(answers)) == 1 else [process_punctuation(a) for a in answers]
    else:
        raise ValueError(f"unknown official VQA evaluation version {version!r}; expected 2021 or 2016")
    scores = []
    for left_out in range(len(truth)):
        agree = sum(1 for j, a in enumerate(truth) if j != left_out and a == predicted)
        scores.append(min(1.0, agree / 3))
    return sum(scores) / len(scores)


def frequent_answers(answers: Sequence[Sequence[str]], top: int = 3128) -> list[str]:
    """The `top` most frequent normalised answers over questions' annotator answers: the candidate list
    for ranked inference (LAVIS's VQA recipes rank 3,128 from VQAv2 train)."""
    counts = Counter(normalize_answer(a) for question in answers for a in question)
    return [answer for answer, _ in counts.most_common(top)]


def majority_answer(questions: Sequence[VqaQuestion]) -> str:
    """The most frequent answer: the blind baseline every VQA model must beat."""
    return frequent_answers([q.answers for q in questions], top=1)[0]


def vqa_metrics(
    questions: Sequence[VqaQuestion], predictions: Sequence[str], version: OfficialVersion = "2021"
) -> dict[str, float]:
    """Overall accuracy and accuracy per answer type (yes/no, number, other)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} answers for {len(questions)} questions")
    by_type: dict[str, list[float]] = {}
    scores = []
    for question, prediction in zip(questions, predictions, strict=True):
        score = vqa_accuracy(prediction, question.answers, version)
        scores.append(score)
        by_type.setdefault(question.answer_type or "all", []).append(score)
    metrics = {"vqa_accuracy": sum(scores) / max(1, len(scores))}
    metrics.update({f"vqa_accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return metrics


def read_answer_list(path: str | Path, top: int = 3128) -> list[str]:
    """Candidate answers for ranked inference: a JSON list of strings, or a VQAv2 annotations file whose
    `top` most frequent answers are taken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read the answer list {path}: {err}") from err
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return data
    if isinstance(data, dict) and "annotations" in data:
        return frequent_answers([annotation_answers(a) for a in data["annotations"]], top)
    raise DataError(f"{path}: expected a JSON list of answers or a VQAv2 annotations file")
