"""Instruction-tuning batches: datasets drawn with probability proportional to the square root of their sizes
(spec `blip2-family.md` §7.4), times optional manual weights; the order depends only on (seed, step), so a
resumed run draws the same batches. Every training record must have the same number of images (a batch
stacks them). Records are read by `vlp.data.instructions`."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp.assets.image import ImageTransform
from vlp.assets.tokenizer import Tokenizer, tokenize_trimmed
from vlp.data.batches import InstructionBatch
from vlp.data.instructions import InstructionRecord, fill_template, read_instructions, read_templates
from vlp.data.pipeline import DataConfig, GoodBatches, TrainingData, map_style_batches
from vlp.data.sources import BadSamples, DataError, Skipped, load_image

Sampling = Literal["sqrt", "proportional", "uniform"]


def mixture_probabilities(sizes: dict[str, int], sampling: Sampling = "sqrt",
                          weights: dict[str, float] | None = None) -> dict[str, float]:
    """The probability of drawing each dataset: proportional to sqrt(size) (the instruction-tuning paper's), to size (plain
    concatenation) or uniform, times its manual weight (default 1)."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise DataError(f"data.weights names datasets the data does not have: {', '.join(unknown)} "
                        f"(datasets: {', '.join(sorted(sizes))})")
    base = {"sqrt": math.sqrt, "proportional": float, "uniform": lambda n: 1.0}[sampling]
    raw = {name: base(size) * weights.get(name, 1.0) for name, size in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        raise DataError("data.weights leaves no dataset to draw from")
    return {name: value / total for name, value in raw.items()}


class MixtureBatchSampler:
    """Endless global batches drawn from several datasets (consecutive index ranges of one dataset of
    `sum(sizes)` items): every slot picks a dataset by `probabilities`, then that dataset's next item in a
    fresh permutation per pass over it. Yields this process's slice as (index, pass) pairs.

    Step s's draws depend only on (seed, s), and each dataset's position on the draws before it, so a run
    started at `start_step` replays the draws (cheap: no data is read) and continues exactly."""

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], batch_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        if any(size < 1 for size in sizes):
            raise DataError("every dataset of a mixture needs at least one sample")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.global_batch = batch_size * world_size

    def _choices(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, step]).choice(len(self.sizes), self.global_batch, p=self.probabilities)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        drawn = np.zeros(len(self.sizes), dtype=np.int64)
        for step in range(self.start_step):
            drawn += np.bincount(self._choices(step), minlength=len(self.sizes))
        orders: dict[tuple[int, int], np.ndarray] = {}
        step = self.start_step
        while True:
            batch = []
            for dataset in self._choices(step).tolist():
                count = int(drawn[dataset])
                drawn[dataset] += 1
                epoch, position = divmod(count, self.sizes[dataset])
                if (dataset, epoch) not in orders:
                    orders = {k: v for k, v in orders.items() if k[0] != dataset}
                    orders[dataset, epoch] = np.random.default_rng([self.seed, dataset, epoch]).permutation(
                        self.sizes[dataset])
                batch.append((int(self.offsets[dataset] + orders[dataset, epoch][position]), epoch))
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            step += 1


# Training batches.


@dataclass
class InstructionDataConfig(DataConfig):
    """The data section of an instruction-tuning run (family instructblip): `train` is one or more record
    files ("a.jsonl::b.jsonl"); datasets are balanced by `sampling` with manual `weights` on top."""

    templates: str | None = None  # a YAML of more templates (name -> wordings) over the shipped ones
    sampling: Sampling = "sqrt"
    weights: dict[str, float] = field(default_factory=dict)  # dataset -> weight multiplied in

    def check(self) -> None:
        if not self.train:
            raise DataError("no training data: pass --data or set data.train (instruction record files)")
        missing = next((part for part in self.train.split("::") if not Path(part).is_file()), None)
        if missing is not None:
            raise DataError(f"instruction records file not found: {missing}")

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"weights.{name}: expected a number >= 0, got {weight!r}")


class InstructionDataset(Dataset):
    """(index, pass) -> one record's transformed image(s), its instruction (a template wording drawn by
    (seed, pass, index)) and its answer, or a `bad` reason."""

    def __init__(self, records: list[InstructionRecord], transform: ImageTransform, templates: dict[str, list[str]],
                 seed: int):
        self.records, self.transform, self.templates, self.seed = records, transform, templates, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        record = self.records[index]
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        try:
            images = [self.transform(load_image(path), rng) for path in record.images]
        except DataError as err:
            return {"bad": Skipped("unreadable_image", f"{record.task} record {record.id or index}: {err}")}
        return {"images": images, "instruction": record.render(self.templates, rng), "answer": record.answer}


class InstructionCollate:
    """Images stacked ([B, 3, H, W], or [B, F, 3, H, W] for F images a record), the instruction and the answer
    in the language model's tokens, and the instruction in the Q-Former's tokens when it is given."""

    def __init__(self, tokenizer: Tokenizer, instruction_tokenizer: Tokenizer | None = None):
        self.tokenizer, self.instruction_tokenizer = tokenizer, instruction_tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> InstructionBatch:
        good = [i for i in items if "bad" not in i]
        bad = [i["bad"] for i in items if "bad" in i]
        if not good:
            return {"bad": bad, "size": 0}
        frames = [torch.stack(i["images"]) for i in good]
        image = torch.stack(frames)
        instructions = [i["instruction"] for i in good]
        # A long instruction loses its start, not the question at its end (LAVIS truncates on the left).
        text, text_mask = tokenize_trimmed(self.tokenizer.truncating_left(), instructions)
        answer, answer_mask = tokenize_trimmed(self.tokenizer, [i["answer"] for i in good])
        batch: dict[str, Any] = {
            "image": image[:, 0] if image.shape[1] == 1 else image,
            "text": text, "text_mask": text_mask, "answer": answer, "answer_mask": answer_mask,
            "bad": bad, "size": len(good),
        }  # fmt: skip
        if self.instruction_tokenizer is not None:
            batch["instruction"], batch["instruction_mask"] = tokenize_trimmed(self.instruction_tokenizer.truncating_left(),
                                                                               instructions)
        return batch


def training_records(cfg: InstructionDataConfig, bad: BadSamples | None = None) -> list[InstructionRecord]:
    """The run's records, refused when they mix image counts; a record with no answer to train on (only
    references, say) is dropped and counted as a bad record, as an unreadable one is."""
    if not cfg.train:
        raise DataError("no training data: pass --data or set data.train (instruction record files)")
    bad = bad or BadSamples(max_fraction=1.0)
    records = read_instructions(cfg.train, images_dir=cfg.images, templates=read_templates(cfg.templates), bad=bad)
    unanswered = [r for r in records if not r.answer]
    if unanswered:
        bad.read(0, [Skipped("bad_record", f"{cfg.train}: a {r.task} record ({r.id or 'no id'}) has no 'answer' to "
                             "train on") for r in unanswered])
        records = [r for r in records if r.answer]
        if not records:
            raise DataError(f"{cfg.train}: no record has an 'answer' to train on")
    counts = {}
    for record in records:
        counts.setdefault(len(record.images), record.task)
    if len(counts) > 1:
        raise DataError(f"{cfg.train}: training records must all have the same number of images; task "
                        + " and task ".join(f"{task} has {n}" for n, task in sorted(counts.items())))
    return records


def instruction_batches(
    cfg: InstructionDataConfig,
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
    instruction_tokenizer: Tokenizer | None = None,
) -> GoodBatches:
    """Endless instruction-tuning batches, datasets mixed by `cfg.sampling` (see the module docstring)."""
    records = training_records(cfg, bad)
    by_dataset: dict[str, list[InstructionRecord]] = {}
    for record in records:
        by_dataset.setdefault(record.dataset, []).append(record)
    ordered = [r for name in sorted(by_dataset) for r in by_dataset[name]]
    sizes = {name: len(by_dataset[name]) for name in sorted(by_dataset)}
    probabilities = mixture_probabilities(sizes, cfg.sampling, cfg.weights)
    sampler = MixtureBatchSampler(list(sizes.values()), list(probabilities.values()), batch_size, seed=seed, rank=rank,
                                  world_size=world_size, start_step=start_step)
    dataset = InstructionDataset(ordered, transform, read_templates(cfg.templates), seed)
    return map_style_batches(dataset, InstructionCollate(tokenizer, instruction_tokenizer), cfg, batch_size=batch_size,
                             seed=seed, bad=bad, sampler=sampler)


def instruction_texts(cfg: InstructionDataConfig) -> Iterator[str]:
    """Every wording of the records' instructions and their answers, for training a tokenizer."""
    templates = read_templates(cfg.templates)
    for record in read_instructions(cfg.train, images_dir=cfg.images, templates=templates):
        if record.instruction is not None:
            yield record.instruction
        else:
            yield from (fill_template(t, record.fields) for t in templates[record.template])
        yield record.answer


# Instruction records: images, an instruction and its answer, from a mixture of task formats.
INSTRUCTION_RECORDS = TrainingData(instruction_batches, instruction_texts, InstructionDataConfig)
