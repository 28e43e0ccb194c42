"""Detection data for OWL-ViT: COCO-format instances (`instances_*.json`, LVIS's extra keys understood),
per-image query lists, and OWL-ViT's augmentation (flip, random crop that keeps boxes, resize with padding
to a square, mosaics, merging of duplicate instances).

Each training example (an image or a mosaic of several) gets its own query list: the names of its boxes,
the negatives its annotation lists (LVIS `neg_category_ids`), and pseudo-negatives drawn in proportion to
how often each class is boxed in the whole training set, up to `num_negatives`. A class an image's
annotation says was not exhaustively labelled (LVIS `not_exhaustive_category_ids`) is never its negative;
classes outside the list get no gradient at all (federated labels). Each distinct label gets one prompt
template drawn per example. Classes in `exclude_classes` lose their boxes and never become queries, so
that they stay unseen by the detector (OWL-ViT's removal of LVIS rare names).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlp.assets.image import ImageTransform, resize_with_pad
from vlp.assets.tokenizer import Tokenizer
from vlp.config import ConfigError, Fraction, PositiveInt
from vlp.data.batches import DetectionBatch
from vlp.data.pipeline import DataConfig, GoodBatches, TrainingData, check_training_data, map_style_batches
from vlp.data.sources import BadSamples, DataError, Skipped, load_image, resolve_image, skipped

DEFAULT_PROMPTS = ("{}", "a photo of a {}", "a picture of a {}", "there is a {}", "a {} in the picture")


def canonical_label(name: str) -> str:
    """OWL-ViT's label canonicalisation: lower case, anything but [a-z0-9-# ] a space, runs collapsed."""
    text = re.sub(r"[^a-z0-9\-# ]", " ", name.lower())
    return re.sub(r"-+", "-", re.sub(r"\s+", " ", text)).strip()


@dataclass
class DetectionImage:
    path: Path
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]  # xyxy pixels
    labels: list[str]  # one canonical class name per box
    negatives: list[str] = field(default_factory=list)  # classes known to be absent
    not_exhaustive: list[str] = field(default_factory=list)  # classes that may be present without a box
    image_id: int = 0


@dataclass
class DetectionSet:
    images: list[DetectionImage]
    categories: dict[int, str]  # category id -> canonical name
    frequency: Counter  # boxes per class name, over the whole file


def read_coco_instances(
    path: str | Path, *, images_dir: str | Path | None = None, exclude: tuple[str, ...] = (),
    exclude_images: bool = False, bad: BadSamples | None = None,
) -> DetectionSet:
    """A COCO instances file: `images` (id, file_name, width, height), `annotations` (image_id, category_id,
    bbox [x, y, w, h] in pixels, iscrowd), `categories` (id, name). Crowd boxes are dropped; a box that is
    not a box inside its image, or names an unknown image or category, is dropped and counted. Boxes of the
    `exclude`d classes are dropped, and with `exclude_images` the images that hold one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO instances file not found: {path}")
    bad = bad or BadSamples(max_fraction=1.0)
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
        categories = {int(c["id"]): canonical_label(str(c["name"])) for c in data["categories"]}
        entries = {int(i["id"]): i for i in data["images"]}
        annotations = list(data["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a COCO instances file (images, annotations, categories): {err}") from err
    excluded = {canonical_label(name) for name in exclude}
    unknown = excluded - set(categories.values())
    if unknown:
        raise ConfigError(f"config key 'data.exclude_classes': {', '.join(sorted(unknown))} not among the "
                          f"categories of {path}")
    roots = [Path(images_dir)] if images_dir else [path.parent, path.parent / "images"]
    images: dict[int, DetectionImage] = {}
    for image_id, entry in entries.items():
        try:
            images[image_id] = DetectionImage(
                resolve_image(str(entry["file_name"]), roots), int(entry["width"]), int(entry["height"]), [], [],
                [categories[c] for c in entry.get("neg_category_ids", []) if c in categories],
                [categories[c] for c in entry.get("not_exhaustive_category_ids", []) if c in categories],
                image_id)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path} image {image_id}: needs file_name, width and height ({err})") from err
    dropped: list[Skipped] = []
    holding_excluded: set[int] = set()
    for number, ann in enumerate(annotations):
        where = f"{path} annotation {ann.get('id', number) if isinstance(ann, dict) else number}"
        reason = annotation_problem(ann, {i: (image.width, image.height) for i, image in images.items()}, categories)
        if reason:
            dropped.append(Skipped("bad_annotation", f"{where}: {reason}"))
            continue
        if ann.get("iscrowd"):
            continue
        label = categories[int(ann["category_id"])]
        if label in excluded:
            holding_excluded.add(int(ann["image_id"]))
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        image = images[int(ann["image_id"])]
        image.boxes.append((x, y, x + w, y + h))
        image.labels.append(label)
    bad.read(len(annotations), dropped)
    kept = [i for i in images.values() if not (exclude_images and i.image_id in holding_excluded)]
    if not any(i.boxes for i in kept):
        raise DataError(f"{path}: no image with a usable box")
    frequency = Counter(label for image in kept for label in image.labels)
    return DetectionSet(kept, categories, frequency)


def annotation_problem(ann: Any, sizes: dict[int, tuple[float, float]], categories: Container[int]) -> str | None:
    """What is wrong with a COCO annotation given its file's image sizes (id -> width, height) and category
    ids, or None."""
    try:
        image_id, category, box = int(ann["image_id"]), int(ann["category_id"]), [float(v) for v in ann["bbox"]]
    except (KeyError, TypeError, ValueError) as err:
        return f"needs image_id, category_id and bbox [x, y, w, h] ({err})"
    if image_id not in sizes:
        return f"image_id {image_id} is not among the file's images"
    if category not in categories:
        return f"category_id {category} is not among the file's categories"
    if len(box) != 4 or not all(np.isfinite(box)):
        return f"bbox {ann['bbox']} is not four finite numbers"
    x, y, w, h = box
    width, height = sizes[image_id]
    if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return f"bbox {box} is empty or outside its {width:g}x{height:g} image"
    return None


@dataclass
class DetectionDataConfig(DataConfig):
    """`train` is a COCO instances JSON; images resolve against `images`, else the file's folder."""

    exclude_classes: tuple[str, ...] = ()  # their boxes are dropped and their names never become queries
    # ... and the images that hold them too (unseen altogether), rather than only unboxed (LVIS's rare classes)
    exclude_images: bool = False
    num_negatives: PositiveInt = 50  # negatives per example, topped up with pseudo-negatives
    max_queries: PositiveInt = 100  # positives first, then negatives, cut at this
    max_instances: PositiveInt = 100
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # one drawn per distinct label and example
    flip: bool = True
    crop_area: tuple[Fraction, Fraction] = (0.3, 1.0)  # random crop: share of the image's area
    crop_ratio: tuple[float, float] = (0.75, 1.33)
    min_box_fraction: Fraction = 0.6  # a cropped box is kept when this share of its area remains
    # Chances of 1x1, 2x2, 3x3 ... mosaics (OWL-ViT's ablations: .5/.33/.17); (1.0,) turns mosaics off.
    mosaic_probs: tuple[Fraction, ...] = (0.5, 0.33, 0.17)
    merge_iou: Fraction = 0.9  # instances overlapping this much become one box with both labels

    def check(self) -> None:
        check_training_data(self)
        if not self.prompts or any("{}" not in p for p in self.prompts):
            raise ConfigError(f"config key 'data.prompts': every template needs a '{{}}', got {list(self.prompts)}")
        if abs(sum(self.mosaic_probs) - 1) > 1e-3:
            raise ConfigError(f"config key 'data.mosaic_probs': {list(self.mosaic_probs)} does not sum to 1")
        if self.crop_area[0] > self.crop_area[1] or self.crop_ratio[0] > self.crop_ratio[1]:
            raise ConfigError("config keys 'data.crop_area' / 'data.crop_ratio': the first value is the larger")


# -- augmentation on (PIL image, xyxy pixel boxes, labels) --------------------------------------------------


def _flip(image: Image.Image, boxes: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    width = image.size[0]
    flipped = boxes.copy()
    flipped[:, [0, 2]] = width - boxes[:, [2, 0]]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped


def random_crop(
    image: Image.Image, boxes: np.ndarray, labels: list[str], rng: random.Random, *,
    area: tuple[float, float], ratio: tuple[float, float], min_box_fraction: float,
) -> tuple[Image.Image, np.ndarray, list[str]]:
    """A crop of random area share and aspect; boxes are clipped to it and kept when at least
    `min_box_fraction` of their area remains."""
    width, height = image.size
    for _ in range(10):
        target = width * height * rng.uniform(*area)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        return image, boxes, labels
    x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = boxes[:, [0, 2]].clip(x0, x0 + w) - x0
    clipped[:, [1, 3]] = boxes[:, [1, 3]].clip(y0, y0 + h) - y0
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    after = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (after > 0) & (after >= min_box_fraction * before)
    return image.crop((x0, y0, x0 + w, y0 + h)), clipped[keep], [lab for lab, k in zip(labels, keep) if k]


def _merge_overlapping(boxes: np.ndarray, labels: list[list[str]], threshold: float,
                       rng: random.Random) -> tuple[np.ndarray, list[list[str]]]:
    """Repeatedly merge the most-overlapping pair at IoU >= threshold: one of the two boxes, both label sets."""
    boxes, labels = boxes.copy(), [list(lab) for lab in labels]
    while len(boxes) > 1:
        top_left = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
        bottom_right = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (bottom_right - top_left).clip(min=0).prod(-1)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
        iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
        np.fill_diagonal(iou, 0)
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        if iou[i, j] < threshold:
            break
        keep, drop = (i, j) if rng.random() < 0.5 else (j, i)
        labels[keep] = list(dict.fromkeys(labels[keep] + labels[drop]))
        boxes = np.delete(boxes, drop, axis=0)
        del labels[drop]
    return boxes, labels


class DetectionDataset(torch.utils.data.Dataset):
    """(index, epoch) -> one augmented example (an image or a mosaic) with its query list, or a `bad` reason.

    Every random choice comes from (seed, epoch, index), so a resumed run sees the same examples."""

    def __init__(self, data: DetectionSet, cfg: DetectionDataConfig, transform: ImageTransform, seed: int):
        self.data, self.cfg, self.seed = data, cfg, seed
        self.size = transform.cfg.size
        self.mean = np.asarray(transform.cfg.mean, dtype=np.float32)
        self.std = np.asarray(transform.cfg.std, dtype=np.float32)
        self.pad_value = transform.cfg.pad_value
        self.resample = transform.resample
        # Pseudo-negatives are drawn in proportion to how often each class is boxed (OWL-ViT's queue).
        self.classes = sorted(data.frequency)

    def __len__(self) -> int:
        return len(self.data.images)

    def _tile(self, entry: DetectionImage, tile: int, rng: random.Random) -> tuple[Image.Image, np.ndarray, list[str]]:
        image = load_image(entry.path)
        boxes = np.asarray(entry.boxes, dtype=np.float64).reshape(-1, 4)
        labels = list(entry.labels)
        if self.cfg.flip and rng.random() < 0.5:
            image, boxes = _flip(image, boxes)
        image, boxes, labels = random_crop(image, boxes, labels, rng, area=self.cfg.crop_area,
                                           ratio=self.cfg.crop_ratio, min_box_fraction=self.cfg.min_box_fraction)
        scale = tile / max(image.size)
        return resize_with_pad(image, tile, self.pad_value, self.resample), boxes * scale, labels

    def _negatives(self, entries: list[DetectionImage], positives: set[str], rng: random.Random) -> list[str]:
        listed = [n for e in entries for n in e.negatives]
        barred = positives | {n for e in entries for n in e.not_exhaustive}
        negatives = list(dict.fromkeys(n for n in listed if n not in barred))
        candidates = [c for c in self.classes if c not in barred and c not in negatives]
        want = self.cfg.num_negatives - len(negatives)
        if want > 0 and candidates:
            if len(candidates) <= want:
                negatives += candidates
            else:
                weights = [self.data.frequency[c] for c in candidates]
                drawn: list[str] = []
                while len(drawn) < want:  # weighted draws without replacement
                    pick = rng.choices(candidates, weights)[0]
                    index = candidates.index(pick)
                    drawn.append(candidates.pop(index))
                    weights.pop(index)
                negatives += drawn
        rng.shuffle(negatives)
        return negatives

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        k = rng.choices(range(1, len(self.cfg.mosaic_probs) + 1), self.cfg.mosaic_probs)[0]
        picks = [index] + [rng.randrange(len(self.data.images)) for _ in range(k * k - 1)]
        tile = self.size // k
        canvas = Image.new("RGB", (self.size, self.size), (round(self.pad_value * 255),) * 3)
        boxes, labels, entries = [], [], []
        for slot, pick in enumerate(picks):
            entry = self.data.images[pick]
            try:
                image, tile_boxes, tile_labels = self._tile(entry, tile, rng)
            except DataError as err:
                return {"bad": skipped(err)}
            row, col = divmod(slot, k)
            canvas.paste(image, (col * tile, row * tile))
            boxes.append(tile_boxes + [col * tile, row * tile, col * tile, row * tile])
            labels += [[lab] for lab in tile_labels]
            entries.append(entry)
        merged, merged_labels = _merge_overlapping(np.concatenate(boxes).reshape(-1, 4), labels,
                                                   self.cfg.merge_iou, rng)
        merged, merged_labels = merged[: self.cfg.max_instances], merged_labels[: self.cfg.max_instances]
        positives = list(dict.fromkeys(lab for labs in merged_labels for lab in labs))
        negatives = self._negatives(entries, set(positives), rng)
        names = (positives + negatives)[: max(self.cfg.max_queries, len(positives))]
        prompts = {name: rng.choice(self.cfg.prompts).format(name) for name in names}
        column = {name: i for i, name in enumerate(names)}
        normalised = torch.from_numpy(merged / self.size).float().clamp(0, 1)
        cxcywh = torch.cat([(normalised[:, :2] + normalised[:, 2:]) / 2, normalised[:, 2:] - normalised[:, :2]], 1)
        array = (np.asarray(canvas, dtype=np.float32) / 255.0 - self.mean) / self.std
        return {
            "image": torch.from_numpy(array.transpose(2, 0, 1).copy()),
            "boxes": cxcywh,
            "labels": [[column[lab] for lab in labs] for labs in merged_labels],
            "queries": [canonical_label(prompts[name]) for name in names],
        }


class DetectionCollate:
    """Examples -> a `DetectionBatch`: queries tokenised per image and padded to the batch's longest list."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> DetectionBatch:
        good = [i for i in items if "bad" not in i]
        bad = [i["bad"] for i in items if "bad" in i]
        if not good:
            return {"bad": bad, "size": 0}
        batch, queries = len(good), max(max(len(i["queries"]), 1) for i in good)
        instances = max(max(len(i["boxes"]), 1) for i in good)
        texts = [q for i in good for q in i["queries"] + [""] * (queries - len(i["queries"]))]
        ids, mask = self.tokenizer(texts)
        labels = torch.zeros(batch, instances, queries)
        boxes = torch.zeros(batch, instances, 4)
        box_mask = torch.zeros(batch, instances, dtype=torch.bool)
        query_mask = torch.zeros(batch, queries, dtype=torch.bool)
        for b, item in enumerate(good):
            n = len(item["boxes"])
            boxes[b, :n], box_mask[b, :n] = item["boxes"], True
            query_mask[b, : len(item["queries"])] = True
            for m, columns in enumerate(item["labels"]):
                labels[b, m, columns] = 1.0
        return {
            "image": torch.stack([i["image"] for i in good]),
            "text": ids.view(batch, queries, -1),
            "text_mask": mask.view(batch, queries, -1),
            "query_mask": query_mask,
            "labels": labels,
            "boxes": boxes,
            "box_mask": box_mask,
            "bad": bad,
            "size": batch,
        }


def detection_batches(
    cfg: DetectionDataConfig, transform: ImageTransform, tokenizer: Tokenizer, *, batch_size: int, seed: int,
    start_step: int = 0, rank: int = 0, world_size: int = 1, bad: BadSamples | None = None, **_: Any,
) -> GoodBatches:
    """Endless detection batches from the COCO instances file `cfg.train`."""
    cfg.check()
    data = read_coco_instances(cfg.train, images_dir=cfg.images, exclude=cfg.exclude_classes,
                               exclude_images=cfg.exclude_images, bad=bad)
    return map_style_batches(DetectionDataset(data, cfg, transform, seed), DetectionCollate(tokenizer), cfg,
                             batch_size=batch_size, seed=seed, start_step=start_step, rank=rank,
                             world_size=world_size, bad=bad)


def detection_texts(cfg: DetectionDataConfig) -> Any:
    """Texts for a new tokenizer: every class name in every prompt."""
    data = read_coco_instances(cfg.train, images_dir=cfg.images, exclude=cfg.exclude_classes)
    excluded = {canonical_label(name) for name in cfg.exclude_classes}
    for name in (n for n in data.categories.values() if n not in excluded):
        for prompt in cfg.prompts:
            yield prompt.format(name)


# Boxes with class names (COCO instances), queried by text.
BOXES = TrainingData(detection_batches, detection_texts, DetectionDataConfig)
