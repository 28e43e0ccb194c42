"""Readers for the image-caption formats users already have: CSV, COCO captions JSON, WebDataset.

Map-style sources (CSV, COCO) become lists of `ImageCaptions`; WebDataset shards stream.
Captions that are empty are dropped here, counted, and reported by `BadSamples`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

log = logging.getLogger("vlp.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """A dataset cannot be read or holds too many bad samples; the message names the path."""


@dataclass
class ImageCaptions:
    path: Path
    captions: list[str]
    key: str = ""


@dataclass
class BadSamples:
    """Counts skipped samples and stops the run when more than `max_fraction` of them are bad."""

    max_fraction: float = 0.05
    min_seen: int = 50  # the share is judged once this many samples were seen
    good: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)

    def update(self, good: int, bad: list[str]) -> None:
        self.good += good
        self.bad += len(bad)
        for reason in bad:
            if len(self.examples) < 20:
                log.warning("skipped bad sample: %s", reason)
            self.examples.append(reason)
        del self.examples[100:]
        self.check()

    def check(self) -> None:
        total = self.good + self.bad
        if total >= self.min_seen and self.bad > self.max_fraction * total:
            raise DataError(
                f"{self.bad} of {total} samples are bad ({self.bad / total:.1%} > max_bad_fraction "
                f"{self.max_fraction:.1%}); first: {'; '.join(self.examples[:3])}"
            )


def _resolve_image(name: str, roots: list[Path]) -> Path:
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate
    for root in roots:
        if (root / candidate).exists():
            return root / candidate
    return roots[0] / candidate


def _group(rows: list[tuple[str, str]], roots: list[Path], where: str, bad: BadSamples) -> list[ImageCaptions]:
    grouped: dict[str, ImageCaptions] = {}
    dropped = []
    for row_no, (image, caption) in enumerate(rows):
        caption = (caption or "").strip()
        if not caption:
            dropped.append(f"{where} entry {row_no}: empty caption for {image}")
            continue
        item = grouped.get(image)
        if item is None:
            item = grouped[image] = ImageCaptions(_resolve_image(image, roots), [], key=image)
        item.captions.append(caption)
    bad.update(0, dropped)
    return list(grouped.values())


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
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    header = text.splitlines()[0] if text else ""
    delimiter = max(",\t;|", key=header.count) if header else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = reader.fieldnames or []
    for column in (image_key, caption_key):
        if column not in columns:
            raise DataError(f"{path}: no column '{column}' (columns: {', '.join(columns) or 'none'})")
    rows = [(r[image_key], r[caption_key]) for r in reader]
    roots = [Path(images_dir)] if images_dir else [path.parent, Path.cwd()]
    return _group(rows, roots, str(path), bad or BadSamples())


def read_coco_captions(
    path: str | Path, *, images_dir: str | Path | None = None, bad: BadSamples | None = None
) -> list[ImageCaptions]:
    """COCO captions JSON: `images` (id, file_name) and `annotations` (image_id, caption)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_text())
        files = {img["id"]: img["file_name"] for img in data["images"]}
        rows = [(files[a["image_id"]], a["caption"]) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a COCO captions file (images/annotations with caption): {err}") from err
    roots = [Path(images_dir)] if images_dir else [path.parent, path.parent / "images"]
    return _group(rows, roots, str(path), bad or BadSamples())


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image, raising `DataError` that names the path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def decode_webdataset_sample(sample: dict) -> tuple[Image.Image, str]:
    """An img2dataset sample (jpg/png/webp bytes + txt or json caption) -> (image, caption)."""
    key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if data is None:
        raise DataError(f"{key}: no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        caption = json.loads(sample["json"]).get("caption") or ""
    else:
        raise DataError(f"{key}: no caption (expected txt or json)")
    if not caption.strip():
        raise DataError(f"{key}: empty caption")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB"), caption.strip()
    except (OSError, ValueError) as err:
        raise DataError(f"{key}: cannot decode image: {err}") from err


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
