"""VQAv2-format question answering data: a questions file and an annotations file with ten annotator
answers per question. Training batches carry each question's distinct answers weighted by how many
annotators gave them (BLIP's VQA objective)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlp.assets.image import ImageTransform
from vlp.assets.tokenizer import Tokenizer, tokenize_trimmed
from vlp.data.batches import VqaBatch
from vlp.data.pipeline import DataConfig, GoodBatches, TrainingData, map_style_batches
from vlp.data.sources import BadSamples, DataError, Skipped, load_image
from vlp.data.vqa_answers import normalize_answer

# VQAv2's COCO images; `data_subtype` comes from the questions file (train2014, val2014, ...).
DEFAULT_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"


@dataclass
class VqaDataConfig(DataConfig):
    """The data section of a VQA run (family blip_vqa): `train` is a VQAv2 questions file, `annotations` its
    answers file; image paths are `images` / `image_pattern` with {image_id} and {data_subtype}
    (None: VQAv2's COCO names)."""

    annotations: str | None = None
    image_pattern: str | None = None


@dataclass
class VqaQuestion:
    question_id: int
    image: Path
    question: str
    answers: list[str] = field(default_factory=list)  # the annotators' raw answers; empty without annotations
    answer_type: str = ""


def annotation_answers(annotation: dict[str, Any]) -> list[str]:
    return [a["answer"] for a in annotation["answers"]]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"VQA {what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"VQA {what} file {path} is not JSON: {err}") from err


def read_vqa(
    questions_file: str | Path,
    annotations_file: str | Path | None = None,
    *,
    images_dir: str | Path | None = None,
    image_pattern: str | None = None,
) -> list[VqaQuestion]:
    """Questions (with their annotators' answers when an annotations file is given). Image paths are
    `images_dir / image_pattern.format(image_id=..., data_subtype=...)`."""
    questions_file = Path(questions_file)
    data = _read_json(questions_file, "questions")
    pattern = image_pattern or DEFAULT_IMAGE_PATTERN
    root = Path(images_dir) if images_dir else questions_file.parent
    subtype = data.get("data_subtype", "")
    answers: dict[int, dict[str, Any]] = {}
    if annotations_file is not None:
        annotations = _read_json(Path(annotations_file), "annotations")
        try:
            answers = {a["question_id"]: a for a in annotations["annotations"]}
        except (KeyError, TypeError) as err:
            raise DataError(f"{annotations_file} is not a VQAv2 annotations file: {err}") from err
    out = []
    try:
        for q in data["questions"]:
            path = root / pattern.format(image_id=q["image_id"], data_subtype=subtype)
            item = VqaQuestion(q["question_id"], path, q["question"])
            if annotations_file is not None:
                if q["question_id"] not in answers:
                    raise DataError(f"{annotations_file}: no annotation for question {q['question_id']}")
                annotation = answers[q["question_id"]]
                item.answers, item.answer_type = annotation_answers(annotation), annotation.get("answer_type", "")
            out.append(item)
    except (KeyError, TypeError) as err:
        raise DataError(f"{questions_file} is not a VQAv2 questions file: {err}") from err
    except (ValueError, IndexError) as err:
        raise DataError(f"image_pattern '{pattern}' does not format: {err}") from err
    return out


def weighted_answers(answers: list[str]) -> list[tuple[str, float]]:
    """Distinct answers, each weighted by the share of annotators who gave it (BLIP's VQA targets)."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)
    total = sum(counts.values())
    return [(answer, count / total) for answer, count in counts.items()]


class VqaDataset(Dataset):
    def __init__(self, questions: list[VqaQuestion], transform: ImageTransform, seed: int):
        self.questions, self.transform, self.seed = questions, transform, seed

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        question = self.questions[index]
        try:
            image = load_image(question.image)
        except DataError as err:
            return {"bad": Skipped("unreadable_image", f"question {question.question_id}: {err}")}
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        answers = weighted_answers(question.answers)
        if not answers:
            return {"bad": Skipped("no_answers", f"question {question.question_id}: no usable answer")}
        return {"image": self.transform(image, rng), "question": question.question, "answers": answers}


class VqaCollate:
    """Images and questions stacked; every question's answers flattened, with `answer_question` the
    index of each answer's question and `answer_weight` its annotator share."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> VqaBatch:
        good = [i for i in items if "bad" not in i]
        bad = [i["bad"] for i in items if "bad" in i]
        if not good:
            return {"bad": bad, "size": 0}
        question, question_mask = tokenize_trimmed(self.tokenizer, [i["question"] for i in good])
        flat = [(row, answer, weight) for row, i in enumerate(good) for answer, weight in i["answers"]]
        answer, answer_mask = tokenize_trimmed(self.tokenizer, [a for _, a, _ in flat])
        return {
            "image": torch.stack([i["image"] for i in good]),
            "text": question,
            "text_mask": question_mask,
            "answer": answer,
            "answer_mask": answer_mask,
            "answer_question": torch.tensor([row for row, _, _ in flat]),
            "answer_weight": torch.tensor([w for _, _, w in flat]),
            "bad": bad,
            "size": len(good),
        }


def vqa_batches(
    cfg: VqaDataConfig,
    transform: ImageTransform,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    bad: BadSamples | None = None,
    position: dict[str, Any] | None = None,
) -> GoodBatches:
    """Endless VQA training batches: `data.train` is the questions file, `data.annotations` the answers."""
    if not cfg.train or not cfg.annotations:
        raise DataError("VQA training needs data.train (questions file) and data.annotations (answers file)")
    questions = read_vqa(cfg.train, cfg.annotations, images_dir=cfg.images, image_pattern=cfg.image_pattern)
    return map_style_batches(VqaDataset(questions, transform, seed), VqaCollate(tokenizer), cfg, batch_size=batch_size,
                             seed=seed, start_step=start_step, rank=rank, world_size=world_size, bad=bad)


def vqa_texts(cfg: VqaDataConfig) -> Iterator[str]:
    """Questions and answers, for training a tokenizer when no pre-trained one is given."""
    for question in read_vqa(cfg.train, cfg.annotations, images_dir=cfg.images, image_pattern=cfg.image_pattern):
        yield question.question
        yield from question.answers


# Questions about images with annotators' answers (VQAv2).
VQA_ANSWERS = TrainingData(vqa_batches, vqa_texts, VqaDataConfig)
