"""Detection AP on COCO-format ground truth through pycocotools (2.0.x `COCOeval`, iouType "bbox"), the
protocol of scenic's open-vocabulary detection evaluator: every category name is a query (a prompt ensemble
averages the logits over templates), the top `max_detections` (box, class) pairs of each image are kept over
all tokens and classes (a box may carry several classes), no NMS, no score threshold.

Per-class AP is read from `eval["precision"]` (area "all", the last maxDets), averaged over the recall
points that exist; "novel" classes (those whose boxes training never saw) are averaged apart from the rest.
Where COCOeval has no value (-1: no large object for APl/ARl, no non-crowd box of a class) the metric is
undefined, reported as None and left out of every mean, as COCOeval leaves it out of its own.
One-shot AP replaces the text queries by image queries: each class's embedding is the mean of the class
embeddings of its first `shots` boxes in an example set.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlp.data.detection import annotation_problem, canonical_label
from vlp.data.sources import resolve_image
from vlp.errors import DataError
from vlp.evals import EvalResult

CHUNK = 64  # images per call of the detector: their scores are reduced to the top detections at once

log = logging.getLogger(__name__)

SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _load_ground_truth(path: Path) -> Any:
    """A COCO instances file as pycocotools' COCO, its unusable boxes (empty, outside the image, not finite)
    dropped with a warning that counts them, as training drops them; `dropped_boxes` holds their number."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataError(f"COCO instances file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
        sizes = {int(i["id"]): (float(i["width"]), float(i["height"])) for i in data["images"]}
        category_ids = {int(c["id"]) for c in data["categories"]}
        annotations = data["annotations"]
        if not isinstance(annotations, list):
            raise TypeError("'annotations' is not a list")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a COCO instances file (images with width and height, annotations, "
                        f"categories): {err!r}") from err
    problems = [(a, annotation_problem(a, sizes, category_ids)) for a in annotations]
    dropped = [f"annotation {a.get('id', n) if isinstance(a, dict) else n}: {why}"
               for n, (a, why) in enumerate(problems) if why]
    if dropped:
        log.warning("%s: %d of %d boxes dropped as unusable (first: %s)", path, len(dropped), len(annotations),
                    dropped[0])
    data["annotations"] = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
                           for a, why in problems if not why]
    if not data["annotations"]:
        raise DataError(f"{path}: no usable ground-truth box to evaluate against")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    coco.dropped_boxes = len(dropped)
    return coco


def top_detections(
    boxes: torch.Tensor, scores: torch.Tensor, category_ids: Sequence[int], image_id: int, max_detections: int
) -> list[dict[str, Any]]:
    """One image's COCO results: the `max_detections` best (token, class) pairs; pixel xyxy -> xywh."""
    flat = scores.flatten()
    count = min(max_detections, flat.numel())
    best = flat.topk(count).indices
    out = []
    for index in best.tolist():
        token, cls = divmod(index, scores.shape[1])
        x0, y0, x1, y1 = boxes[token].tolist()
        out.append({"image_id": image_id, "category_id": int(category_ids[cls]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(flat[index])})
    return out


def coco_metrics(coco_gt: Any, results: list[dict[str, Any]], novel: Sequence[int] = ()) -> dict[str, Any]:
    """pycocotools' summary (AP, AP50, ...), per-class AP, and mean AP of the novel classes and of the rest."""
    from pycocotools.cocoeval import COCOeval

    category_ids = sorted(coco_gt.getCatIds())
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(category_ids)}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco_gt, _detections(coco_gt, results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    summary = {name: _defined(v) for name, v in zip(SUMMARY_NAMES, evaluation.stats, strict=True)}
    precision = evaluation.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M maxDets]
    per_class: dict[str, float | None] = {}
    for k, category in enumerate(evaluation.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[names[category]] = float(values.mean()) if values.size else None
    metrics: dict[str, Any] = {**summary, "per_class_AP": per_class}
    if novel:
        metrics["AP_novel"] = _mean_defined(per_class[names[c]] for c in novel)
        metrics["AP_base"] = _mean_defined(per_class[names[c]] for c in category_ids if c not in novel)
    return metrics


def _detections(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    """The results as a COCO object; none at all is an empty one (`loadRes` refuses an empty list), which
    COCOeval scores 0 where a class has ground truth."""
    from pycocotools.coco import COCO

    if results:
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.imgs.values()), "categories": coco_gt.dataset["categories"],
                     "annotations": []}
    empty.createIndex()
    return empty


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)


def _mean_defined(values: Iterable[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def category_names(ground_truth: str | Path) -> list[str]:
    """The category names of a COCO instances file, in category-id order (the evaluation's query order)."""
    coco = _load_ground_truth(Path(ground_truth))
    return [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]


def _category_ids(coco_gt: Any, novel: Sequence[str], where: Path) -> tuple[list[int], list[str], list[int]]:
    category_ids = sorted(coco_gt.getCatIds())
    names = [c["name"] for c in coco_gt.loadCats(category_ids)]
    by_name = {canonical_label(n): c for n, c in zip(names, category_ids, strict=True)}
    unknown = [n for n in novel if canonical_label(n) not in by_name]
    if unknown:
        raise DataError(f"--novel {', '.join(unknown)}: not among the categories of {where} ({', '.join(names)})")
    return category_ids, names, [by_name[canonical_label(n)] for n in novel]


def _image_paths(coco_gt: Any, gt_path: Path, images_dir: str | Path | None, limit: int | None) -> list[tuple[int, Path]]:
    roots = [Path(images_dir)] if images_dir else [gt_path.parent, gt_path.parent / "images"]
    ids = sorted(coco_gt.getImgIds())[:limit]
    return [(i, resolve_image(coco_gt.imgs[i]["file_name"], roots)) for i in ids]


def evaluate_boxes(
    box_scores: Callable[[Sequence[Any], torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]],
    query_embeddings: torch.Tensor,
    ground_truth: str | Path,
    *,
    images_dir: str | Path | None = None,
    novel: Sequence[str] = (),
    max_detections: int = 100,
    limit: int | None = None,
) -> EvalResult:
    """COCO AP of a detector's `box_scores(images, query_embeddings)` (per image: pixel xyxy boxes [P, 4],
    scores [P, C]) with one query (or one per template, [T, C, E]) per category of `ground_truth`, in its
    category-id order."""
    ground_truth = Path(ground_truth)
    coco_gt = _load_ground_truth(ground_truth)
    category_ids, _names, novel_ids = _category_ids(coco_gt, novel, ground_truth)
    if query_embeddings.shape[-2] != len(category_ids):
        raise ValueError(f"{query_embeddings.shape[-2]} queries for {len(category_ids)} categories")
    images = _image_paths(coco_gt, ground_truth, images_dir, limit)
    results = []
    with tqdm(total=len(images), desc="detecting", unit="image", leave=False, disable=len(images) <= CHUNK) as bar:
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK]
            for (image_id, _), (boxes, scores) in zip(chunk, box_scores([p for _, p in chunk], query_embeddings),
                                                      strict=True):
                results += top_detections(boxes, scores, category_ids, image_id, max_detections)
            bar.update(len(chunk))
    metrics = coco_metrics(_restricted(coco_gt, [i for i, _ in images]), results, novel_ids)
    per_class = metrics.pop("per_class_AP")
    return EvalResult("detection", str(ground_truth), metrics,
                      protocol=f"pycocotools COCOeval bbox, top {max_detections} (box, class) pairs per image, no NMS",
                      details={"images": len(images), "dropped_boxes": coco_gt.dropped_boxes, "novel": list(novel),
                               "per_class_AP": per_class})


def _restricted(coco_gt: Any, image_ids: list[int]) -> Any:
    """The ground truth of only these images (an evaluation `--limit`ed to the first N)."""
    if len(image_ids) == len(coco_gt.getImgIds()):
        return coco_gt
    from pycocotools.coco import COCO

    keep = set(image_ids)
    data = {"images": [coco_gt.imgs[i] for i in image_ids],
            "annotations": [a for a in coco_gt.dataset["annotations"] if a["image_id"] in keep],
            "categories": coco_gt.dataset["categories"]}
    subset = COCO()
    subset.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        subset.createIndex()
    return subset


def one_shot_queries(
    embed_image_queries: Callable[[Sequence[Any], Sequence[Sequence[float]]], torch.Tensor],
    examples: str | Path,
    category_names: Sequence[str],
    *,
    images_dir: str | Path | None = None,
    shots: int = 1,
) -> torch.Tensor:
    """[C, E]: per category (by name, in the given order), the mean image-query embedding of its first `shots`
    boxes in the COCO instances file `examples` (crowd boxes skipped)."""
    examples = Path(examples)
    coco = _load_ground_truth(examples)
    by_name = {canonical_label(c["name"]): c["id"] for c in coco.loadCats(coco.getCatIds())}
    roots = [Path(images_dir)] if images_dir else [examples.parent, examples.parent / "images"]
    out = []
    for name in category_names:
        category = by_name.get(canonical_label(name))
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(catIds=[category] if category else []))
                       if not a.get("iscrowd")][:shots] if category is not None else []
        if not annotations:
            raise DataError(f"{examples}: no example box of category '{name}' for its image query")
        paths = [resolve_image(coco.imgs[a["image_id"]]["file_name"], roots) for a in annotations]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in annotations]
        out.append(embed_image_queries(paths, boxes).mean(dim=0))
    return torch.stack(out)
