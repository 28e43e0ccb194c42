"""Readers for the image-caption formats users already have: CSV, COCO captions JSON, WebDataset.

Map-style sources (CSV, COCO) become lists of `ImageCaptions`; WebDataset shards stream.
Rows that cannot be used (an empty caption, text that is not UTF-8, an unknown image id) are dropped
here, and images that cannot be read are dropped when loaded; `BadSamples` counts both by cause.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlp.errors import DataError

log = logging.getLogger("vlp.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# Why a sample or a row was skipped. The order is fixed: processes add up their counts as one vector.
CAUSES = (
    "unreadable_image",  # missing, truncated or not an image
    "empty_caption",
    "undecodable_text",  # bytes that are not UTF-8
    "unknown_image_id",  # a COCO caption whose image id is not among the file's images
    "missing_image",  # a WebDataset sample with no image file
    "missing_caption",  # a WebDataset sample with no caption file
    "no_answers",  # a VQA question whose annotators gave no usable answer
    "truncated_shard",  # a WebDataset shard that ends in the middle (its remaining samples are lost)
    "bad_record",  # an instruction record without an image or an answer, or with a template it cannot fill
    "bad_annotation",  # a detection box that is empty, outside its image, or names an unknown image or class
)


@dataclass(frozen=True)
class Skipped:
    """One skipped sample or row: why (one of `CAUSES`) and which."""

    cause: str
    detail: str


def skipped(err: DataError) -> Skipped:
    return Skipped(err.cause or "unreadable_image", str(err))


@dataclass
class ImageCaptions:
    path: Path
    captions: list[str]
    key: str = ""


@dataclass
class BadSamples:
    """Skipped samples by cause, and the rule that stops a run on data that is mostly broken.

    Two kinds of count: rows dropped when a caption file is read (exact: the whole file is read at once,
    the same on every process) and samples that fail when loaded (drawn again each epoch, per process).
    The share of bad data is 1 - (1 - dropped/rows) x (1 - failed/drawn); the loaded part counts only
    once `min_samples` were drawn, so a few bad images among the first batches do not stop a run.
    """

    max_fraction: float = 0.05
    min_samples: int = 2000
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    drawn: int = 0
    failed: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def read(self, rows: int, dropped: list[Skipped]) -> None:
        """A caption file of `rows` rows was read and `dropped` of them skipped."""
        self.rows += rows
        self.dropped.update(item.cause for item in dropped)
        self._note(dropped)
        self.check()

    def update(self, good: int, bad: list[Skipped]) -> None:
        """Samples were drawn: `good` loaded and `bad` failed. A truncated shard is no sample and is not
        counted as drawn."""
        samples = [item for item in bad if item.cause != "truncated_shard"]
        self.drawn += good + len(samples)
        self.failed.update(item.cause for item in bad)
        self._note(bad)
        self.check()

    def _note(self, items: list[Skipped]) -> None:
        for item in items:
            if len(self.examples) < 20 and item.cause != "truncated_shard":  # the stream logged it already
                log.warning("skipped bad sample: %s", item.detail)
            self.examples.append(item.detail)
        del self.examples[100:]

    @property
    def bad(self) -> int:
        return sum(self.dropped.values()) + sum(self.failed.values())

    def fraction(self) -> float:
        """The estimated share of bad data (the loaded part once `min_samples` were drawn)."""
        read_share = sum(self.dropped.values()) / self.rows if self.rows else 0.0
        loaded = self.drawn >= self.min_samples
        failed = sum(n for cause, n in self.failed.items() if cause != "truncated_shard")
        load_share = failed / self.drawn if loaded else 0.0
        return 1 - (1 - read_share) * (1 - load_share)

    def check(self) -> None:
        share = self.fraction()
        if share > self.max_fraction:
            parts = []
            if self.dropped:
                parts.append(f"{sum(self.dropped.values())} of {self.rows} rows dropped when read")
            if self.failed:
                parts.append(f"{sum(self.failed.values())} of {self.drawn} drawn samples failed to load")
            causes = ", ".join(f"{c} {n}" for c, n in (self.dropped + self.failed).most_common())
            raise DataError(
                f"about {share:.1%} of the training samples are bad (more than data.max_bad_fraction "
                f"{self.max_fraction:.1%}): {'; '.join(parts)} ({causes}); first: {'; '.join(self.examples[:3])}"
            )


def resolve_image(name: str, roots: list[Path]) -> Path:
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate
    for root in roots:
        if (root / candidate).exists():
            return root / candidate
    return roots[0] / candidate


def _group(rows: list[tuple[int, str, str | Skipped]], roots: list[Path], where: str,
           bad: BadSamples) -> list[ImageCaptions]:
    """(row number, image, caption or the reason it was skipped) -> images with their captions."""
    grouped: dict[str, ImageCaptions] = {}
    dropped = []
    for row_no, image, caption in rows:
        if isinstance(caption, Skipped):
            dropped.append(caption)
            continue
        caption = (caption or "").strip()
        if not caption:
            dropped.append(Skipped("empty_caption", f"{where} {row_no}: empty caption for {image}"))
            continue
        item = grouped.get(image)
        if item is None:
            item = grouped[image] = ImageCaptions(resolve_image(image, roots), [], key=image)
        item.captions.append(caption)
    bad.read(len(rows), dropped)
    return list(grouped.values())


def _has_undecodable(text: str) -> bool:
    """Bytes that were not UTF-8, kept as lone surrogates by the 'surrogateescape' error handler."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def csv_reader(path: Path) -> csv.DictReader:
    """The rows of a CSV/TSV by column, its separator detected from the header. Bytes that are not UTF-8 are
    kept as surrogates, so that the rows holding them can be skipped by name."""
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    header = text.splitlines()[0] if text else ""
    return csv.DictReader(io.StringIO(text), delimiter=max(",\t;|", key=header.count) if header else ",")


def read_csv(
    path: str | Path,
    *,
    image_key: str = "filepath",
    caption_key: str = "title",
    images_dir: str | Path | None = None,
    bad: BadSamples | None = None,
) -> list[ImageCaptions]:
    """A CSV/TSV with an image path column and a caption column; the separator is detected."""
    path = Path(path)
    reader = csv_reader(path)
    columns = reader.fieldnames or []
    for column in (image_key, caption_key):
        if column not in columns:
            raise DataError(f"{path}: no column '{column}' (columns: {', '.join(columns) or 'none'})")
    rows: list[tuple[int, str, str | Skipped]] = []
    for r in reader:
        image, caption = r[image_key] or "", r[caption_key]
        where = f"{path} line {reader.line_num}"
        if _has_undecodable(image) or _has_undecodable(caption or ""):
            rows.append((reader.line_num, image, Skipped("undecodable_text", f"{where}: text is not UTF-8")))
        else:
            rows.append((reader.line_num, image, caption))
    roots = [Path(images_dir)] if images_dir else [path.parent, Path.cwd()]
    return _group(rows, roots, f"{path} line", bad or BadSamples(max_fraction=1.0))


def read_coco_captions(
    path: str | Path, *, images_dir: str | Path | None = None, bad: BadSamples | None = None
) -> list[ImageCaptions]:
    """COCO captions JSON: `images` (id, file_name) and `annotations` (image_id, caption)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        rows: list[tuple[int, str, str | Skipped]] = []
        for number, annotation in enumerate(data["annotations"]):
            image_id = annotation["image_id"]
            if image_id in files:
                rows.append((number, files[image_id], annotation["caption"]))
            else:
                name = f"annotation {annotation.get('id', number)}"
                rows.append((number, str(image_id), Skipped(
                    "unknown_image_id", f"{path} {name}: image_id {image_id!r} is not among the file's images")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a COCO captions file (images/annotations with caption): {err}") from err
    roots = [Path(images_dir)] if images_dir else [path.parent, path.parent / "images"]
    return _group(rows, roots, f"{path} annotation", bad or BadSamples(max_fraction=1.0))


def as_rgb(image: Image.Image) -> Image.Image:
    """An image as it is shown, in 8-bit RGB: turned upright by its EXIF orientation, and with 16-bit (or
    32-bit integer) greyscale scaled to 8 bits (PIL's own conversion clips it, so it would read as white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image (upright, 8-bit RGB), raising `DataError` that names the path."""
    try:
        with Image.open(path) as image:
            return as_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}", cause="unreadable_image") from err


def decode_webdataset_sample(sample: dict) -> tuple[Image.Image, str]:
    """An img2dataset sample (jpg/png/webp bytes + txt or json caption) -> (image, caption)."""
    key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if data is None:
        raise DataError(f"{key}: no image (expected one of {', '.join(IMAGE_EXTENSIONS)})", cause="missing_image")
    try:
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        elif "json" in sample:
            caption = json.loads(sample["json"]).get("caption") or ""
        else:
            raise DataError(f"{key}: no caption (expected txt or json)", cause="missing_caption")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"{key}: caption is not UTF-8 text: {err}", cause="undecodable_text") from err
    if not caption.strip():
        raise DataError(f"{key}: empty caption", cause="empty_caption")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return as_rgb(image), caption.strip()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{key}: cannot decode image: {err}", cause="unreadable_image") from err


def detect_format(spec: str) -> str:
    """'csv', 'coco' or 'webdataset' from a data spec (a file path or a shard pattern)."""
    lowered = spec.lower()
    if lowered.endswith((".csv", ".tsv")):
        return "csv"
    if lowered.endswith(".json"):
        return "coco"
    if lowered.endswith(".tar") or "{" in spec or "::" in spec:
        return "webdataset"
    raise DataError(f"cannot tell the format of '{spec}': expected a .csv/.tsv, a COCO .json or .tar shards")


def read_captions(
    spec: str,
    *,
    images_dir: str | Path | None = None,
    image_key: str = "filepath",
    caption_key: str = "title",
    bad: BadSamples | None = None,
) -> list[ImageCaptions]:
    """Read a map-style caption file (CSV or COCO JSON) into images with their captions."""
    kind = detect_format(spec)
    if kind == "csv":
        return read_csv(spec, image_key=image_key, caption_key=caption_key, images_dir=images_dir, bad=bad)
    if kind == "coco":
        return read_coco_captions(spec, images_dir=images_dir, bad=bad)
    raise DataError(f"'{spec}' is a WebDataset; evaluation needs a CSV or a COCO captions JSON")
