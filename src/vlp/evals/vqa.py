"""VQA accuracy as the official VQAv2 evaluation computes it.

An answer scores min(#annotators who gave it / 3, 1), averaged over the ten ways of leaving one of the
ten annotators out. Before comparing, the predicted answer is normalised (whitespace, punctuation,
number words to digits, articles dropped, apostrophe-less contractions restored); the annotators'
answers only have their punctuation processed, and only when they disagree, as in the official code.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlp.data.sources import DataError
from vlp.data.vqa import VqaQuestion, annotation_answers, read_vqa

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern's look-behind is written "(?!<=\d)", a negative look-ahead for the text "<=" and a
# digit: in effect any period not followed by a digit is removed. Kept as it behaves.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")

# English contractions; every spelling with some of the apostrophes left out maps to the full form
# ("dont" -> "don't", "couldntve" -> "couldn't've"), which is what the official table lists by hand.
_CONTRACTED = ["ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've"]


def _contractions() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        parts = word.split("'")
        for kept in itertools.product((True, False), repeat=len(parts) - 1):
            if all(kept):
                continue
            spelled = parts[0] + "".join(("'" if k else "") + p for k, p in zip(kept, parts[1:], strict=True))
            table[spelled] = word
    return table


_CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """Drop punctuation next to a space (or anywhere when the text has a number like 1,000); replace it
    with a space elsewhere; remove periods that are not decimal points."""
    out = text
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or glued:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_and_articles(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1] against its annotators' answers (ten in VQAv2)."""
    predicted = normalize_answer(prediction)
    truth = list(answers) if len(set(answers)) == 1 else [process_punctuation(a) for a in answers]
    scores = []
    for left_out in range(len(truth)):
        agree = sum(1 for j, a in enumerate(truth) if j != left_out and a == predicted)
        scores.append(min(1.0, agree / 3))
    return sum(scores) / len(scores)


def frequent_answers(answers: Sequence[Sequence[str]], top: int = 3128) -> list[str]:
    """The `top` most frequent normalised answers over questions' annotator answers: the candidate list
    for ranked inference (BLIP ranks 3,128 from VQAv2 train)."""
    counts = Counter(normalize_answer(a) for question in answers for a in question)
    return [answer for answer, _ in counts.most_common(top)]


def majority_answer(questions: Sequence[VqaQuestion]) -> str:
    """The most frequent answer: the blind baseline every VQA model must beat."""
    return frequent_answers([q.answers for q in questions], top=1)[0]


def vqa_metrics(questions: Sequence[VqaQuestion], predictions: Sequence[str]) -> dict[str, float]:
    """Overall accuracy and accuracy per answer type (yes/no, number, other)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} answers for {len(questions)} questions")
    by_type: dict[str, list[float]] = {}
    scores = []
    for question, prediction in zip(questions, predictions, strict=True):
        score = vqa_accuracy(prediction, question.answers)
        scores.append(score)
        by_type.setdefault(question.answer_type or "all", []).append(score)
    metrics = {"vqa_accuracy": sum(scores) / max(1, len(scores))}
    metrics.update({f"vqa_accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return metrics


def evaluate_vqa(
    answer: Callable[[list[Path], list[str]], list[str]],
    questions_file: str | Path,
    annotations_file: str | Path,
    images_dir: str | Path | None = None,
    *,
    image_pattern: str | None = None,
) -> dict[str, Any]:
    """Answer every question of a VQAv2-format split and score it; predictions are kept in the official
    results format ([{question_id, answer}])."""
    questions = read_vqa(questions_file, annotations_file, images_dir=images_dir, image_pattern=image_pattern)
    predictions = answer([q.image for q in questions], [q.question for q in questions])
    return {
        "task": "vqa",
        "dataset": str(questions_file),
        "metrics": vqa_metrics(questions, predictions),
        "predictions": [
            {"question_id": q.question_id, "answer": a} for q, a in zip(questions, predictions, strict=True)
        ],
    }


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
