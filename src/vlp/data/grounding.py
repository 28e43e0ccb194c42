"""Referring expressions in RefCOCO's layout (lichengunc/refer): `refs(<splitBy>).p`, a pickled list of refs
({ref_id, ann_id, image_id, split, sentences: [{sent, raw, ...}]}), beside a COCO `instances.json`. The
referred box is its annotation's; the image's other annotations are the candidate regions that
proposal-based methods and baselines choose among.

The pickle is read by an unpickler that builds only lists, dicts, strings and numbers: a refs file is
data, and no code in it is ever run.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from vlp.data.sources import DataError, resolve_image


@dataclass
class ReferringExpression:
    image: Path
    sentence: str
    box: tuple[float, float, float, float]  # the referred object, xyxy pixels
    candidates: list[tuple[float, float, float, float]]  # every annotated object of the image, xyxy pixels
    ref_id: int
    split: str


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a refs file holds only lists, dicts, strings and numbers, not {module}.{name}")


def _read_refs(path: Path) -> list[dict]:
    try:
        refs = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError as err:
        raise DataError(f"refs file not found: {path}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path} is not a RefCOCO refs pickle: {err}") from err
    if not isinstance(refs, list):
        raise DataError(f"{path} is not a RefCOCO refs pickle: it holds a {type(refs).__name__}, not a list")
    return refs


def in_split(ref_split: str, split: str) -> bool:
    """The REFER API's `getRefIds(split=...)` rule: `test` is every test split (RefCOCO's testA and testB),
    `testA` every test split holding A (testA, testAB), other names exactly."""
    if split == "test":
        return "test" in ref_split
    if split in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


def read_referring_expressions(
    refs: str | Path, instances: str | Path | None = None, *, images_dir: str | Path | None = None,
    split: str | None = None,
) -> list[ReferringExpression]:
    """Every sentence of the refs of `split` (all splits when None; chosen as the REFER API chooses them), one
    expression each, as in RefCOCO's evaluation (the unit is the sentence, not the object). `instances` defaults to the refs' folder's."""
    refs = Path(refs)
    instances = Path(instances) if instances else refs.parent / "instances.json"
    if not instances.is_file():
        raise DataError(f"COCO instances file not found: {instances}")
    try:
        coco = json.loads(instances.read_text())
        files = {int(i["id"]): str(i["file_name"]) for i in coco["images"]}
        boxes: dict[int, tuple[int, tuple[float, float, float, float]]] = {}
        for ann in coco["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes[int(ann["id"])] = (int(ann["image_id"]), (x, y, x + w, y + h))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{instances} is not a COCO instances file (images, annotations with bbox): {err}") from err
    by_image: dict[int, list[tuple[float, float, float, float]]] = {}
    for image_id, box in boxes.values():
        by_image.setdefault(image_id, []).append(box)
    roots = [Path(images_dir)] if images_dir else [instances.parent, instances.parent.parent]
    out = []
    for number, ref in enumerate(_read_refs(refs)):
        try:
            if split is not None and not in_split(str(ref["split"]), split):
                continue
            image_id, box = boxes[int(ref["ann_id"])]
            sentences = [s["sent"] for s in ref["sentences"]]
            out += [ReferringExpression(resolve_image(files[image_id], roots), sentence, box, by_image[image_id],
                                        int(ref.get("ref_id", number)), str(ref["split"])) for sentence in sentences]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{refs} ref {number}: needs ann_id (an annotation of {instances}), split and "
                            f"sentences with 'sent' ({err!r})") from err
    if not out:
        known = sorted({str(r.get("split")) for r in _read_refs(refs) if isinstance(r, dict)})
        raise DataError(f"{refs}: no referring expression in split {split!r} (splits: {', '.join(known)})")
    return out
