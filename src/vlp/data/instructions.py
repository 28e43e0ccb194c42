"""Instruction data: records of image(s), instruction, answer and task, the readers that turn the formats
vlp already reads into such records, and instruction templates (the training batches and the balanced
mixture sampler are `vlp.data.instruction_batches`).

A record file is JSON Lines (or a JSON list), one record per line:

    {"image": "images/1.png" | ["left.png", "right.png"],
     "task": "vqa",                      # what it is an example of; the evaluation scores by task
     "dataset": "shapes-vqa",            # optional (default: the task): the unit the sampler balances
     "instruction": "What colour is ...?" | "template": "vqa", "fields": {"question": "What colour ...?"},
     "answer": "red",                    # the training target
     "answers": ["red", "red", ...],     # optional: every reference (VQA's annotators, captions)
     "candidates": ["yes", "no"] | [["yes", "true"], ["no", "false"]],  # optional: a closed task's labels
     "relevance": [0.0, 1.0, 0.5],       # optional: each candidate's dense relevance (VisDial's NDCG)
     "id": "..."}                        # optional

A VisDial v1.0 dialog file ({"data": {"questions", "answers", "dialogs"}}) is read as it is: one `dialog`
record per answered round, the caption and earlier rounds as its history, its 100 answer options the
candidates (and their dense relevance, where the dense annotations file is given).

A record with a template gets one of the template's wordings each time it is drawn (seeded by run seed,
epoch and index); templates are kept in YAML files (`templates/instructions.yaml`, and a user's own over it).
Records that cannot be used are dropped when read and counted as `bad_record`; images that cannot be read
are skipped when loaded, as everywhere in vlp.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlp.data.nlvr import read_nlvr
from vlp.data.sources import BadSamples, DataError, Skipped, read_coco_captions, resolve_image
from vlp.data.vqa import read_vqa
from vlp.data.vqa_answers import normalize_answer
from vlp.outputs import write_text

TEMPLATES_FILE = Path(__file__).parent / "templates" / "instructions.yaml"


def read_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    """The shipped templates, with a user's file (name -> list of wordings) over them."""
    templates = _template_file(TEMPLATES_FILE)
    if path is not None:
        templates.update(_template_file(Path(path)))
    return templates


def _template_file(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataError(f"instruction templates file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"instruction templates file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(t, str) for t in v) for v in data.values()
    ):
        raise DataError(f"{path}: expected a mapping of template name -> non-empty list of wordings")
    return {str(k): list(v) for k, v in data.items()}


@dataclass
class InstructionRecord:
    images: list[Path]
    task: str
    answer: str = ""
    instruction: str | None = None
    template: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    dataset: str = ""
    answers: list[str] = field(default_factory=list)
    # A closed task's labels, each as its words (a label and its verbalizers); `answer` is one of them.
    candidates: list[list[str]] | None = None
    relevance: list[float] | None = None
    id: str = ""

    def __post_init__(self) -> None:
        self.dataset = self.dataset or self.task

    def render(self, templates: dict[str, list[str]], rng: random.Random) -> str:
        """The instruction: as written, or one wording of its template filled with its fields."""
        if self.instruction is not None:
            return self.instruction
        return fill_template(rng.choice(templates[self.template]), self.fields)

    @property
    def label(self) -> int | None:
        """The index of the right candidate (closed tasks)."""
        if self.candidates is None:
            return None
        return next((i for i, words in enumerate(self.candidates) if self.answer in words), None)

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        """The record as a line of a record file; image paths relative to `root` when given."""
        def name(path: Path) -> str:
            return os.path.relpath(path.resolve(), root.resolve()) if root is not None else str(path)

        data: dict[str, Any] = {"image": name(self.images[0]) if len(self.images) == 1 else [name(p) for p in self.images],
                                "task": self.task}
        if self.dataset != self.task:
            data["dataset"] = self.dataset
        if self.instruction is not None:
            data["instruction"] = self.instruction
        else:
            data["template"], data["fields"] = self.template, self.fields
        data["answer"] = self.answer
        if self.answers:
            data["answers"] = self.answers
        if self.candidates is not None:
            data["candidates"] = [words[0] if len(words) == 1 else words for words in self.candidates]
        if self.relevance is not None:
            data["relevance"] = self.relevance
        if self.id:
            data["id"] = self.id
        return data


def fill_template(template: str, fields: dict[str, str]) -> str:
    return template.format(**fields)


class BadRecord(ValueError):
    """What is wrong with one record (it is skipped and counted as `bad_record`)."""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"'{what}' must be a string, got {value!r}")
    return value


def parse_record(data: Any, roots: list[Path], templates: dict[str, list[str]]) -> InstructionRecord:
    """One record of a record file; `BadRecord` says what is wrong with it."""
    if not isinstance(data, dict):
        raise BadRecord(f"expected a JSON object, got {data!r}")
    image = data.get("image")
    names = image if isinstance(image, list) else [image]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise BadRecord("'image' must be a path or a non-empty list of paths")
    task = _text(data.get("task"), "task")
    if ("instruction" in data) == ("template" in data):
        raise BadRecord("give 'instruction' or 'template' (with 'fields'), one of them")
    fields = data.get("fields", {})
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise BadRecord("'fields' must map field names to strings")
    template = data.get("template")
    if template is not None:
        if template not in templates:
            raise BadRecord(f"unknown template '{template}' (known: {', '.join(sorted(templates))})")
        for wording in templates[template]:
            try:
                fill_template(wording, fields)
            except (KeyError, IndexError, ValueError) as err:
                raise BadRecord(f"template '{template}' wording {wording!r} needs field {err}") from err
    candidates = data.get("candidates")
    if candidates is not None:
        if not isinstance(candidates, list) or len(candidates) < 2:
            raise BadRecord("'candidates' must list at least two labels")
        candidates = [[c] if isinstance(c, str) else c for c in candidates]
        if not all(isinstance(c, list) and c and all(isinstance(w, str) and w for w in c) for c in candidates):
            raise BadRecord("each candidate must be a word or a non-empty list of words")
    answer = data.get("answer", "")
    answer = _text(answer, "answer").strip()
    answers = data.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise BadRecord("'answers' must be a list of strings")
    if not answer and not answers and candidates is None:
        raise BadRecord("no answer")
    relevance = data.get("relevance")
    if relevance is not None and (candidates is None or not isinstance(relevance, list) or len(relevance) != len(
            candidates) or not all(isinstance(v, int | float) and math.isfinite(v) for v in relevance)):
        raise BadRecord("'relevance' must hold one finite number per candidate")
    instruction = _text(data["instruction"], "instruction") if "instruction" in data else None
    record = InstructionRecord(
        images=[_resolve(n, roots) for n in names], task=task, answer=answer, instruction=instruction,
        template=template, fields=fields, dataset=_text(data.get("dataset", task), "dataset"), answers=answers,
        candidates=candidates, relevance=relevance, id=str(data.get("id", "")),
    )  # fmt: skip
    if candidates is not None and answer and record.label is None:
        raise BadRecord(f"answer {answer!r} is none of the candidates")
    return record


def _resolve(name: str, roots: list[Path]) -> Path:
    path = Path(name)
    if path.is_absolute():
        return path
    return next((root / path for root in roots if (root / path).exists()), roots[0] / path)


def _lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of a JSON Lines file or a JSON list; a line that does not parse is kept
    as a DataError for the caller to count."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not a JSON list of records: {err}") from err
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                out.append((number, DataError(f"not JSON: {err}")))
    return out


def read_instructions(
    spec: str, *, images_dir: str | Path | None = None, templates: dict[str, list[str]] | None = None,
    bad: BadSamples | None = None, dense: str | Path | None = None,
) -> list[InstructionRecord]:
    """Records of one or more record files ("a.jsonl::b.jsonl"), or VisDial v1.0 dialog files (`dense`: their
    dense annotations); unusable records are dropped and counted in `bad` as `bad_record`, each named by file
    and line."""
    templates = templates if templates is not None else read_templates()
    bad = bad or BadSamples(max_fraction=1.0)
    records: list[InstructionRecord] = []
    for part in spec.split("::"):
        path = Path(part)
        if not path.is_file():
            raise DataError(f"instruction records file not found: {path}")
        roots = [Path(images_dir)] if images_dir else [path.parent, Path.cwd()]
        rows = _lines(path)
        if len(rows) == 1 and is_visdial(rows[0][1]):
            records += visdial_records(path, rows[0][1], roots, templates["dialog"][0], dense)
            continue
        dropped = []
        for number, data in rows:
            try:
                if isinstance(data, DataError):
                    raise BadRecord(str(data))
                records.append(parse_record(data, roots, templates))
            except BadRecord as err:
                dropped.append(Skipped("bad_record", f"{path} record {number}: {err}"))
        bad.read(len(rows), dropped)
    if not records:
        raise DataError(f"{spec}: no usable instruction record")
    return records


def is_visdial(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("data"), dict) and "dialogs" in data["data"]


def visdial_records(path: Path, data: dict[str, Any], roots: list[Path], wording: str,
                    dense: str | Path | None = None) -> list[InstructionRecord]:
    """The answered rounds of a VisDial v1.0 file (test-std's last rounds have no answer and are left out),
    each instruction written out in `wording` (of template `dialog`), so that they can be evaluated."""
    try:
        questions, answers, split = data["data"]["questions"], data["data"]["answers"], data.get("split", "")
        relevance = {(d["image_id"], d["round_id"]): d["gt_relevance"] for d in _dense(dense)} if dense else {}
        out = []
        for dialog in data["data"]["dialogs"]:
            image_id = dialog["image_id"]
            names = [f"VisualDialog_{split}_{image_id:012d}.jpg", f"COCO_train2014_{image_id:012d}.jpg",
                     f"COCO_val2014_{image_id:012d}.jpg", f"{image_id}.jpg", f"{image_id:012d}.jpg"]
            found = [resolve_image(n, roots) for n in names]
            image = next((p for p in found if p.exists()), found[0])
            history = [dialog["caption"].rstrip(".") + "."]
            for number, turn in enumerate(dialog["dialog"], start=1):
                question = questions[turn["question"]].rstrip("?") + "?"
                if "gt_index" in turn and "answer_options" in turn:
                    options = [answers[i] for i in turn["answer_options"]]
                    fields = {"history": " ".join(history), "question": question}
                    out.append(InstructionRecord(
                        [image], "dialog", answer=options[turn["gt_index"]],
                        instruction=fill_template(wording, fields), fields=fields,
                        candidates=[[o] for o in options], relevance=relevance.get((image_id, number)),
                        id=f"{image_id}_{number}"))
                if "answer" in turn:
                    history.append(f"Q: {question} A: {answers[turn['answer']]}.")
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a VisDial v1.0 file (data: questions, answers, dialogs): {err!r}") from err
    return out


def _dense(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"VisDial dense annotations file not found: {path}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not VisDial dense annotations JSON: {err}") from err


def write_instructions(path: str | Path, records: Sequence[InstructionRecord]) -> Path:
    """A JSON Lines record file; image paths are written relative to its folder."""
    path = Path(path)
    return write_text(path, "".join(json.dumps(r.to_dict(path.parent)) + "\n" for r in records))


# Readers: the formats vlp already reads, as instruction records.


def coco_caption_records(path: str | Path, *, images_dir: str | Path | None = None,
                         task: str = "caption") -> list[InstructionRecord]:
    """A COCO captions file: one record per caption (template `caption`), every caption of its image as
    its references."""
    out = []
    for item in read_coco_captions(path, images_dir=images_dir):
        for caption in item.captions:
            out.append(InstructionRecord([item.path], task, answer=caption, template="caption",
                                         answers=list(item.captions), id=item.key))
    return out


def vqa_records(questions: str | Path, annotations: str | Path, *, images_dir: str | Path | None = None,
                image_pattern: str | None = None, task: str = "vqa") -> list[InstructionRecord]:
    """VQAv2 questions: template `vqa`, the annotators' most frequent answer the target, all ten the
    references (VQA accuracy)."""
    out = []
    for q in read_vqa(questions, annotations, images_dir=images_dir, image_pattern=image_pattern):
        counts = Counter(normalize_answer(a) for a in q.answers)
        counts.pop("", None)
        if counts:
            out.append(InstructionRecord([q.image], task, answer=counts.most_common(1)[0][0], template="vqa",
                                         fields={"question": q.question}, answers=list(q.answers),
                                         id=str(q.question_id)))
    return out


def vqg_records(questions: str | Path, annotations: str | Path, *, images_dir: str | Path | None = None,
                image_pattern: str | None = None, task: str = "vqg") -> list[InstructionRecord]:
    """Visual question generation from VQAv2 questions: the answer in the instruction (template `vqg`),
    the question the target."""
    return [InstructionRecord(r.images, task, answer=r.fields["question"], template="vqg",
                              fields={"answer": r.answer}, id=r.id)
            for r in vqa_records(questions, annotations, images_dir=images_dir, image_pattern=image_pattern)]


def nlvr_records(path: str | Path, *, images_dir: str | Path | None = None,
                 task: str = "pair_statement") -> list[InstructionRecord]:
    """NLVR-style statements about image pairs ({images: [left, right], sentence, label}): two images,
    template `pair_statement`, answer yes or no among the verbalizers yes/true and no/false."""
    return [InstructionRecord([pair.left, pair.right], task, answer="yes" if pair.label else "no",
                              template="pair_statement", fields={"statement": pair.sentence},
                              candidates=[["yes", "true"], ["no", "false"]], id=str(index))
            for index, pair in enumerate(read_nlvr(path, images_dir=images_dir))]


def region_text(box: Sequence[float], width: float, height: float) -> str:
    """A COCO box [x, y, w, h] in pixels as [x0, y0, x1, y1] in fractions of the image, two decimals."""
    x, y, w, h = box
    return "[" + ", ".join(f"{v:.2f}" for v in (x / width, y / height, (x + w) / width, (y + h) / height)) + "]"


def detection_records(instances: str | Path, *, images_dir: str | Path | None = None,
                      task: str = "region") -> list[InstructionRecord]:
    """COCO instances as region questions (template `region`): the box in the instruction, the object's
    name the answer (an annotation's own `name` where it has one, else its category's)."""
    instances = Path(instances)
    try:
        data = json.loads(instances.read_text())
        images = {i["id"]: i for i in data["images"]}
        categories = {c["id"]: c["name"] for c in data["categories"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{instances} is not a COCO instances file: {err}") from err
    roots = [Path(images_dir)] if images_dir else [instances.parent, instances.parent / "images"]
    out = []
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None or ann.get("iscrowd"):
            continue
        name = ann.get("name") or categories.get(ann.get("category_id"), "")
        region = region_text(ann["bbox"], image["width"], image["height"])
        out.append(InstructionRecord([_resolve(image["file_name"], roots)], task, answer=name, template="region",
                                     fields={"region": region}, id=str(ann.get("id", ""))))
    return out
