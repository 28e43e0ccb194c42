"""The shapes world as an instruction-tuning task suite (InstructBLIP's setting, spec §7.6 and §11.6 C5):
held-in task formats to train on and held-out formats, whole categories of them, evaluated zero-shot.

    held in   caption         captioning                    generate  CIDEr
              vqa             short VQA (colour, shape,     generate  VQA accuracy
                              size, count, yes/no)
              vqg             question generation           generate  CIDEr
              region          region text (box -> object)   generate  exact match
    held out  spatial         spatial relations, yes/no     rank      accuracy
              multiple_choice lettered options              rank      accuracy
              pair_statement  statements about two images   rank      accuracy
              dialog          visual dialog, short history  rank      MRR (and R@1)
              classify        image classification          rank      accuracy
              count           counting, new wordings        generate  exact match

Held-in tasks come through the readers any user's data goes through (COCO captions, VQAv2, COCO
instances); the rest from the world's scene annotations (instances with colour and size). The four
held-in training sets differ in size (the sampler's reason to exist): every caption and question of the
train split, 2,000 region questions, 500 generated questions.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.config import NonNegativeInt, PositiveInt
from vlp.data.instructions import (
    InstructionRecord,
    coco_caption_records,
    detection_records,
    nlvr_records,
    read_templates,
    vqa_records,
    vqg_records,
    write_instructions,
)
from vlp.data.sources import DataError
from vlp.flags import option
from vlp.shapes.language import relation_between
from vlp.shapes.scene import COLORS, NUMBER_WORDS, SHAPES, SIZES, ShapeObject

YES_NO = [["yes", "true"], ["no", "false"]]


@dataclass(frozen=True)
class TaskSpec:
    category: str
    held_in: bool
    method: str  # generate | rank
    metric: str  # cider | vqa_accuracy | exact_match | accuracy | mrr


TASKS = {
    "caption": TaskSpec("captioning", True, "generate", "cider"),
    "vqa": TaskSpec("short VQA", True, "generate", "vqa_accuracy"),
    "vqg": TaskSpec("question generation", True, "generate", "cider"),
    "region": TaskSpec("region text", True, "generate", "exact_match"),
    "spatial": TaskSpec("spatial relations (yes/no)", False, "rank", "accuracy"),
    "multiple_choice": TaskSpec("multiple choice", False, "rank", "accuracy"),
    "pair_statement": TaskSpec("two-image statements", False, "rank", "accuracy"),
    "dialog": TaskSpec("visual dialog", False, "rank", "mrr"),
    "classify": TaskSpec("image classification", False, "rank", "accuracy"),
    "count": TaskSpec("counting", False, "generate", "exact_match"),
}
TRAIN_LIMITS = {"region": 2000, "vqg": 500}


def _scenes(instances: Path) -> dict[str, list[ShapeObject]]:
    """Image file -> its objects, from a shapes-world instances file (colour and size kept per annotation)."""
    data = json.loads(instances.read_text())
    files = {i["id"]: i["file_name"] for i in data["images"]}
    shapes = {c["id"]: c["name"] for c in data["categories"]}
    scenes: dict[str, list[ShapeObject]] = {files[i]: [] for i in files}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        scenes[files[ann["image_id"]]].append(ShapeObject(shapes[ann["category_id"]], ann["color"], ann["size"],
                                                          x + w / 2, y + h / 2, w / 2))
    return scenes


def _literal(record: InstructionRecord, templates: dict[str, list[str]], rng: random.Random) -> InstructionRecord:
    """The record with one wording of its template written out (evaluation files are fixed)."""
    record.instruction, record.template, record.fields = record.render(templates, rng), None, {}
    return record


def _spatial(path: Path, objects: list[ShapeObject], rng: random.Random) -> InstructionRecord | None:
    if len(objects) < 2:
        return None
    a, b = rng.sample(objects, 2)
    truth = relation_between(a, b)
    relations = ["to the left of", "to the right of", "above", "below"]
    relation = truth if rng.random() < 0.5 else rng.choice([r for r in relations if r != truth])
    statement = f"the {a.name} is {relation} the {b.name}"
    return InstructionRecord([path], "spatial", answer="yes" if relation == truth else "no", template="spatial",
                             fields={"statement": statement}, candidates=YES_NO)


def _multiple_choice(path: Path, objects: list[ShapeObject], rng: random.Random) -> InstructionRecord:
    target = rng.choice(objects)
    if rng.random() < 0.5 and sum(o.color == target.color for o in objects) == 1:
        question, answer, pool = f"What shape is the {target.color} object?", target.shape, SHAPES
    else:
        question, answer, pool = f"What colour is the {target.size} {target.shape}?", target.color, list(COLORS)
        if sum(o.shape == target.shape for o in objects) > 1:
            question = f"What colour is the {target.shape} at x = {target.cx:.0f}?"
    options = [answer, *rng.sample([p for p in pool if p != answer], 2)]
    rng.shuffle(options)
    lettered = " ".join(f"({letter}) {option}" for letter, option in zip("abc", options, strict=True))
    return InstructionRecord([path], "multiple_choice", answer=answer, template="multiple_choice",
                             fields={"question": question, "options": lettered}, candidates=[[o] for o in options])


def _facts(objects: list[ShapeObject]) -> list[tuple[str, str]]:
    """Questions a scene answers, for dialog turns."""
    out = [("how many shapes are there?", str(len(objects)))]
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            out += [(f"what color is the {o.shape}?", o.color), (f"is the {o.shape} large?", "yes" if o.size ==
                                                                                             "large" else "no")]
        if sum(p.color == o.color for p in objects) == 1:
            out.append((f"what shape is the {o.color} one?", o.shape))
    return out


def _dialog(path: Path, objects: list[ShapeObject], rng: random.Random) -> InstructionRecord:
    turns = rng.sample(_facts(objects), min(3, len(_facts(objects))))
    *history, (question, answer) = turns
    lines = " ".join(f"Q: {q} A: {a}." for q, a in history) or "(none)"
    pool = sorted({*COLORS, *SHAPES, *SIZES, "yes", "no", "1", "2", "3", "4"} - {answer})
    options = [answer, *rng.sample(pool, 9)]
    rng.shuffle(options)
    return InstructionRecord([path], "dialog", answer=answer, template="dialog",
                             fields={"history": lines, "question": question}, candidates=[[o] for o in options])


def _count(path: Path, objects: list[ShapeObject]) -> InstructionRecord:
    n = len(objects)
    return InstructionRecord([path], "count", answer=str(n), template="count", answers=[str(n), NUMBER_WORDS[n]])


@dataclass
class SuiteCommand:
    """`vlp data instructions`: the world to read, where to write the suite, its seed and size."""

    world: str = option(help="a shapes world folder (vlp data shapes)")
    out: str = option(help="the folder to write")
    seed: NonNegativeInt = option(0, help="the suite's seed")
    per_task: PositiveInt = option(200, help="test records per task")


def make_instruction_suite(world: str | Path, out: str | Path, *, seed: int = 0, per_task: int = 200) -> dict[str, Any]:
    """Write the suite of a shapes world (`vlp data shapes`) under `out`: `train.jsonl` (the held-in tasks,
    templates drawn per sample in training), `test/<task>.jsonl` (`per_task` records of every task, wordings
    fixed) and `tasks.json` (each task's category, split, method, metric and file)."""
    world, out = Path(world), Path(out)
    if not (world / "instances_test.json").is_file():
        raise DataError(f"{world} is not a shapes world (no instances_test.json): write one with `vlp data shapes`")
    rng = random.Random(seed)
    templates = read_templates()
    train: list[InstructionRecord] = []
    train += coco_caption_records(world / "captions_train.json")
    train += vqa_records(world / "vqa" / "questions_train.json", world / "vqa" / "annotations_train.json",
                         images_dir=world, image_pattern="images/train/{image_id:06d}.png")
    for task, records in (
        ("vqg", vqg_records(world / "vqa" / "questions_train.json", world / "vqa" / "annotations_train.json",
                            images_dir=world, image_pattern="images/train/{image_id:06d}.png")),
        ("region", detection_records(world / "instances_train.json", images_dir=world)),
    ):
        train += rng.sample(records, min(TRAIN_LIMITS[task], len(records)))
    write_instructions(out / "train.jsonl", train)

    test: dict[str, list[InstructionRecord]] = {}
    captions = coco_caption_records(world / "captions_test.json")
    one_per_image = list({r.id: r for r in captions}.values())  # references: every caption of the image
    test["caption"] = one_per_image
    questions = (world / "vqa" / "questions_test.json", world / "vqa" / "annotations_test.json")
    test["vqa"] = vqa_records(*questions, images_dir=world, image_pattern="images/test/{image_id:06d}.png")
    test["vqg"] = vqg_records(*questions, images_dir=world, image_pattern="images/test/{image_id:06d}.png")
    for record in test["vqg"]:
        record.answers = [record.answer]
    test["region"] = detection_records(world / "instances_test.json", images_dir=world)
    scenes = [(world / name, objects) for name, objects in _scenes(world / "instances_test.json").items()]
    test["spatial"] = [r for r in (_spatial(p, objs, rng) for p, objs in scenes) if r is not None]
    test["multiple_choice"] = [_multiple_choice(p, objs, rng) for p, objs in scenes]
    test["pair_statement"] = nlvr_records(world / "nlvr_test.json")
    test["dialog"] = [_dialog(p, objs, rng) for p, objs in scenes]
    test["count"] = [_count(p, objs) for p, objs in scenes]
    with (world / "zeroshot" / "shape.csv").open() as f:
        rows = list(csv.DictReader(f))
    classes = ", ".join(SHAPES)
    test["classify"] = [InstructionRecord([world / "zeroshot" / row["filepath"]], "classify", answer=row["label"],
                                          template="classify", fields={"classes": classes},
                                          candidates=[[s] for s in SHAPES]) for row in rows]
    manifest: dict[str, Any] = {"seed": seed, "world": str(world), "train": "train.jsonl",
                                "train_records": {t: sum(r.task == t for r in train) for t in TASKS if TASKS[t].held_in},
                                "tasks": {}}
    for task, spec in TASKS.items():
        records = rng.sample(test[task], min(per_task, len(test[task])))
        records = [_literal(r, templates, rng) for r in records]
        write_instructions(out / "test" / f"{task}.jsonl", records)
        manifest["tasks"][task] = {"category": spec.category, "split": "held_in" if spec.held_in else "held_out",
                                   "method": spec.method, "metric": spec.metric, "file": f"test/{task}.jsonl",
                                   "records": len(records)}
    (out / "tasks.json").write_text(json.dumps(manifest, indent=1))
    return manifest


