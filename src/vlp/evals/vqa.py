"""VQA accuracy exactly as the official VQA evaluation computes it.

The official code is GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`. Its
normalisation changed over the years; vlp follows one revision of it at a time, by name:

- "2021" (the default): the latest revision, a013f00 of 2021-03-11 ("Fixed processing answers bug").
  Answers are stripped of tabs, newlines and outer spaces. Only when the annotators disagree are both
  their answers and the prediction normalised (punctuation, number words to digits, articles dropped,
  apostrophe-less contractions restored); when all annotators agree, the prediction must equal their
  answer as written.
- "2016": revision 458a8b2 of 2016-10-08, which LAVIS and BLIP copied: the prediction is always
  normalised; the annotators' answers only lose their punctuation, and only when they disagree.

Both use the same punctuation list (which has `{ } - !` and not `:` or `'`) and the same hand-written
contractions table, reproduced below as published, quirks included ("somebody'd" maps to "somebodyd";
the capitalised keys never match lower-cased text).

A prediction scores min(#other annotators who gave it / 3, 1), averaged over the ten ways of leaving one
of the ten annotators out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from vlp.data.sources import DataError
from vlp.data.vqa import VqaQuestion, annotation_answers, read_vqa

OfficialVersion = Literal["2021", "2016"]

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern's look-behind is written "(?!<=\d)", a negative look-ahead for the text "<=" and a
# digit: in effect any period not followed by a digit is removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call passes re.UNICODE (32) where `sub` takes its `count`: at most 32 periods go.
_PERIODS_REMOVED = int(re.UNICODE)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: a mark next to a space (or any mark, when the text has a
    number like 1,000) is removed, any other is replaced by a space; periods that are not decimal
    points are removed."""
    out = text
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or glued:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, _PERIODS_REMOVED)


def process_digits_and_articles(text: str) -> str:
    """The official `processDigitArticle`: lower-cased words, number words as digits, articles dropped,
    contractions written without apostrophes restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it when annotators disagree: whitespace,
    punctuation, digits, articles and contractions processed."""
    return process_digits_and_articles(process_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], version: OfficialVersion = "2021") -> float:
    """One question's accuracy in [0, 1] against its annotators' answers (ten in VQAv2), as the named
    revision of the official code computes it (see the module docstring)."""
    if version == "2021":
        truth = [_clean(a) for a in answers]
        predicted = _clean(prediction)
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
    for ranked inference (BLIP ranks 3,128 from VQAv2 train)."""
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


def evaluate_vqa(
    answer: Callable[[list[Path], list[str]], list[str]],
    questions_file: str | Path,
    annotations_file: str | Path,
    images_dir: str | Path | None = None,
    *,
    image_pattern: str | None = None,
    version: OfficialVersion = "2021",
) -> dict[str, Any]:
    """Answer every question of a VQAv2-format split and score it; predictions are kept in the official
    results format ([{question_id, answer}])."""
    questions = read_vqa(questions_file, annotations_file, images_dir=images_dir, image_pattern=image_pattern)
    predictions = answer([q.image for q in questions], [q.question for q in questions])
    return {
        "task": "vqa",
        "dataset": str(questions_file),
        "protocol": f"official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py), {version} revision",
        "metrics": vqa_metrics(questions, predictions, version),
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
