"""NLVR2-style data: a statement about a pair of images, true or false. Two layouts are read:

- BLIP's: a JSON list of {"images": [left, right], "sentence": ..., "label": true/false (or "True"/"False")};
- the official NLVR2 JSON Lines (nlvr2/data/{train,dev,test1}.json): {"identifier": "dev-850-0-0", "sentence",
  "label": "True", "left_url", "right_url", "directory" (train)}; the images are the identifier without its
  sentence number, "-img0.png" and "-img1.png", found under the images folder, its `<split>/` or
  `<split>/<directory>/` (the official download's layout).

The identifier `<split>-<set>-<pair>-<sentence>` names the statement an example belongs to: the examples of
one statement are the pairs its sentence was written for, which NLVR2's consistency groups."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlp.assets.image import ImageTransform
from vlp.assets.tokenizer import Tokenizer
from vlp.data.batches import ImagePairBatch
from vlp.data.pipeline import DataConfig, GoodBatches, TrainingData, map_style_batches
from vlp.data.sources import BadSamples, DataError, load_image, resolve_image, skipped


@dataclass
class ImagePairStatement:
    left: Path
    right: Path
    sentence: str
    label: bool
    identifier: str = ""

    @property
    def statement(self) -> str:
        """What the official consistency groups by: the identifier without its pair number, else the sentence."""
        parts = self.identifier.split("-")
        return "-".join((*parts[:2], parts[3])) if len(parts) == 4 else self.sentence


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{where}: label {value!r} is not true or false")


def _entries(path: Path) -> list[Any]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _pair(entry: dict[str, Any], root: Path) -> tuple[Path, Path]:
    if "images" in entry:
        left, right = entry["images"]
        return resolve_image(left, [root]), resolve_image(right, [root])
    prefix = entry["identifier"].rsplit("-", 1)[0]
    split = prefix.split("-")[0]
    roots = [root, root / split, root / split / str(entry.get("directory", ""))]
    return resolve_image(f"{prefix}-img0.png", roots), resolve_image(f"{prefix}-img1.png", roots)


def read_nlvr(path: str | Path, images_dir: str | Path | None = None) -> list[ImagePairStatement]:
    """The statements of a BLIP-layout JSON list or an official NLVR2 JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"NLVR file not found: {path}")
    root = Path(images_dir) if images_dir else path.parent
    try:
        entries = _entries(path)
        out = []
        for n, e in enumerate(entries):
            if not str(e["sentence"]).strip():
                raise DataError(f"{path} entry {n}: empty sentence")
            left, right = _pair(e, root)
            out.append(ImagePairStatement(left, right, e["sentence"], _label(e["label"], f"{path} entry {n}"),
                                          str(e.get("identifier", ""))))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path} is not an NLVR file (a list of images [left, right], sentence, label; or NLVR2 "
                        f"JSON Lines of identifier, sentence, label): {err}") from err
    return out


class NlvrDataset(Dataset):
    def __init__(self, items: list[ImagePairStatement], transform: ImageTransform, seed: int):
        self.items, self.transform, self.seed = items, transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        entry = self.items[index]
        try:
            left, right = load_image(entry.left), load_image(entry.right)
        except DataError as err:
            return {"bad": skipped(err)}
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        return {"left": self.transform(left, rng), "right": self.transform(right, rng), "sentence": entry.sentence,
                "label": int(entry.label)}  # fmt: skip


class NlvrCollate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> ImagePairBatch:
        good = [i for i in items if "bad" not in i]
        bad = [i["bad"] for i in items if "bad" in i]
        if not good:
            return {"bad": bad, "size": 0}
        text, text_mask = self.tokenizer([i["sentence"] for i in good])
        return {
            "left": torch.stack([i["left"] for i in good]),
            "right": torch.stack([i["right"] for i in good]),
            "text": text,
            "text_mask": text_mask,
            "labels": torch.tensor([i["label"] for i in good]),
            "bad": bad,
            "size": len(good),
        }


def nlvr_batches(
    cfg: DataConfig,
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
    """Endless training batches of image pairs with statements and labels from `data.train`."""
    if not cfg.train:
        raise DataError("NLVR training needs data.train (a JSON list of images, sentence, label)")
    items = read_nlvr(cfg.train, cfg.images)
    return map_style_batches(NlvrDataset(items, transform, seed), NlvrCollate(tokenizer), cfg, batch_size=batch_size,
                             seed=seed, start_step=start_step, rank=rank, world_size=world_size, bad=bad)


def nlvr_texts(cfg: DataConfig) -> Iterator[str]:
    yield from (item.sentence for item in read_nlvr(cfg.train, cfg.images))


# Statements about image pairs, true or false (NLVR2).
IMAGE_PAIR_STATEMENTS = TrainingData(nlvr_batches, nlvr_texts)
