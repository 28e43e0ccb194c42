"""Open-vocabulary detection: boxes for objects named by text or shown by an example box; evaluated by
COCO AP through pycocotools (`vlp.evals.detection`), novel classes apart. Trained on boxes with class names."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from vlp.abilities import DetectsBoxes
from vlp.assets.image import boxes_to_image, boxes_to_input
from vlp.config import Fraction, PositiveInt
from vlp.data.detection import BOXES
from vlp.data.sources import load_image
from vlp.errors import BadQuery, ConfigError, NonFiniteOutput
from vlp.evals.detection import category_names, evaluate_boxes, one_shot_queries
from vlp.evals.zeroshot import check_templates, read_lines
from vlp.flags import option
from vlp.geometry import box_cxcywh_to_xyxy, non_maximum_suppression
from vlp.outputs import replacing, write_text
from vlp.tasks.base import (
    Command,
    EvalResult,
    Evaluation,
    FunctionsFactory,
    ImageInput,
    PredictFunction,
    Predictor,
    Task,
    batch_starts,
    open_image,
    per_item,
)
from vlp.tasks.embedding import EXAMPLE_TEXTS

# The detector predicts a set, but near-duplicate boxes on one object read as two objects to a user: the
# paper's demo suppresses boxes overlapping a better one above IoU 0.3, as vlp detect does unless told otherwise.
NMS_IOU = 0.3


@dataclass
class Detection:
    box: list[float]  # x0, y0, x1, y1 in the original image's pixels
    score: float  # sigmoid of the box's logit for its query
    label: int  # index of the query
    query: str  # the query's text, or "image query N"


class DetectionPredictor(Predictor):
    """Open-vocabulary detection: text queries (prompt ensembles average the logits over templates, as
    scenic's evaluator) or image queries (an example image and a box). Boxes come back in the original
    images' pixels, whatever the resize (padding, squashing) the weights were trained with."""

    abilities = (DetectsBoxes,)
    task = "detect objects"

    default_batch_size = 8

    @property
    def prompts(self) -> list[str]:
        """The prompt templates the detector was trained with (its checkpoint's), else the bare text."""
        return list(self.pretrained.assets.prompts) or ["{}"]

    @torch.no_grad()
    def embed_queries(self, texts: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Texts -> query embeddings [T, Q, E], one row per template (default: the detector's own prompts)."""
        if not texts:
            raise BadQuery("no queries: give at least one text (or an image query)")
        templates = templates or self.prompts
        prompts = [template.format(text) for template in templates for text in texts]
        ids, mask = self.tokenizer(prompts)
        with self.autocast:
            embeddings = self.model.embed_queries(ids.to(self.device), mask.to(self.device)).float()
        return embeddings.view(len(templates), len(texts), -1)

    def _pixels(self, image: ImageInput) -> tuple[torch.Tensor, int, int]:
        picture = open_image(image)
        return self.transform(picture), picture.size[0], picture.size[1]

    @per_item(2)
    @torch.no_grad()
    def embed_image_queries(self, images: Sequence[ImageInput], boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """Example images, each with the pixel box (x0, y0, x1, y1) of the object it shows -> [N, E]: the
        class embedding of the token that predicts that object (one-shot queries)."""
        out = []
        for image, box in zip(images, boxes, strict=True):
            pixels, width, height = self._pixels(image)
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise BadQuery(f"query box {list(box)} is not a box inside the {width}x{height} query image")
            normalised = boxes_to_input(torch.tensor([[x0, y0, x1, y1]]), width, height, self.pretrained.image_config)
            with self.autocast:
                embedding, _ = self.model.embed_image_query(pixels[None].to(self.device), normalised.to(self.device))
            out.append(embedding.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def box_scores(
        self, images: Sequence[ImageInput], query_embeddings: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every token's box and its scores: per image (pixel xyxy boxes [P, 4], sigmoid scores [P, Q]);
        query_embeddings [Q, E] or [T, Q, E] (logits averaged over T)."""
        queries = query_embeddings if query_embeddings.dim() == 3 else query_embeddings[None]
        out = []
        for start in batch_starts(len(images), self.batch_size, "detecting" if self.progress else None):
            loaded = [self._pixels(image) for image in images[start : start + self.batch_size]]
            pixels = torch.stack([p for p, _, _ in loaded]).to(self.device)
            with self.autocast:
                boxes, logits = self.model.detect(pixels, queries.to(self.device))
            if not (torch.isfinite(boxes).all() and torch.isfinite(logits).all()):
                raise NonFiniteOutput(f"{self.pretrained.path}: the model's boxes or scores are NaN or infinite "
                                      "(did its training diverge?)")
            for b, (_, width, height) in enumerate(loaded):
                xyxy = box_cxcywh_to_xyxy(boxes[b].float().cpu())
                out.append((boxes_to_image(xyxy, width, height, self.pretrained.image_config),
                            logits[b].float().sigmoid().cpu()))
        return out

    @per_item(1)
    def detect(
        self,
        images: Sequence[ImageInput],
        queries: Sequence[str] = (),
        *,
        query_embeddings: torch.Tensor | None = None,
        query_names: Sequence[str] = (),
        templates: Sequence[str] | None = None,
        threshold: float = 0.1,
        top_k: int | None = None,
        nms: float | None = NMS_IOU,
    ) -> list[list[Detection]]:
        """Boxes for text `queries` (or `query_embeddings` [Q, E] from image queries, labelled `query_names`):
        per image, every token whose best query scores at least `threshold`, labelled with that query, best
        first; lower-scoring boxes overlapping a kept one above IoU `nms` are dropped (None keeps them all)."""
        if query_embeddings is None:
            query_embeddings = self.embed_queries(queries, templates)
            names = list(queries)
        else:
            names = list(query_names) or [f"image query {i}" for i in range(query_embeddings.shape[-2])]
        results = []
        for boxes, scores in self.box_scores(images, query_embeddings):
            best, label = scores.max(dim=1)
            keep = (best >= threshold).nonzero().squeeze(1)
            keep = keep[best[keep].argsort(descending=True)]
            if nms is not None and len(keep):
                keep = keep[non_maximum_suppression(boxes[keep], best[keep], nms)]
            if top_k is not None:
                keep = keep[:top_k]
            results.append([Detection([round(v, 2) for v in boxes[i].tolist()], round(float(best[i]), 4),
                                      int(label[i]), names[int(label[i])]) for i in keep.tolist()])
        return results


@dataclass
class DetectRequest:
    """Images and what to find in them: text queries, or example boxes in example images (each example its own
    query, or, with `one_query`, all of them examples of one thing, averaged)."""

    images: list[str] = option(help="image files", image=True)
    queries: list[str] = option(default_factory=list, help="texts naming what to find")
    query_images: list[str] = option(default_factory=list, help="example images of what to find", image=True)
    query_boxes: list[list[float]] = option(default_factory=list, help="x0, y0, x1, y1 of the object in each "
                                            "example image, in its pixels")
    one_query: bool = option(False, help="the examples all show one kind of thing: average them into one query")
    templates: list[str] = option(default_factory=list, help="prompt templates with {} (logits averaged; default: "
                                  "those the detector was trained with)")
    threshold: Fraction = option(0.1, help="keep boxes scoring at least this")
    top_k: PositiveInt | None = option(None, help="keep at most this many boxes per image")
    nms: Fraction | None = option(NMS_IOU, help="drop boxes overlapping a better one above this IoU (1: keep all)")


@dataclass
class DetectResponse:
    detections: list[list[Detection]]  # per image, best first


def detect(functions: Any, request: DetectRequest) -> DetectResponse:
    if bool(request.queries) == bool(request.query_images):
        raise BadQuery("give text queries or example images with their boxes, not both")
    if len(request.query_boxes) != len(request.query_images):
        raise BadQuery(f"{len(request.query_boxes)} example boxes for {len(request.query_images)} example images")
    run = functions.require("detect")
    options = {"threshold": request.threshold, "top_k": request.top_k, "nms": request.nms}
    if request.query_images:
        embeddings = functions.require("embed_image_queries")(request.query_images, request.query_boxes)
        examples = [f"{Path(image).name} {[round(v) for v in box]}"
                    for image, box in zip(request.query_images, request.query_boxes, strict=True)]
        names = [f"like {example}" for example in examples]
        if request.one_query:
            embeddings, names = embeddings.mean(dim=0, keepdim=True), [f"like {', '.join(examples)}"]
        return DetectResponse(run(request.images, query_embeddings=embeddings, query_names=names, **options))
    return DetectResponse(run(request.images, request.queries, templates=request.templates or None, **options))


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


# Drawings of small images are enlarged to this shorter side, so that labels fit beside their boxes.
DRAWING_MIN_SIDE = 480


def draw_detections(images: Sequence[str | Path], detections: Sequence[Sequence[Any]], folder: str | Path
                    ) -> list[Path]:
    """Each image with its boxes, query and score drawn, written as `<name>.detections.png` in `folder` (a
    new name, so no input image is ever overwritten; inputs sharing a name get `<name>-2...`). Returns the
    files written."""
    folder = Path(folder)
    written: list[Path] = []
    for path, found in zip(images, detections, strict=True):
        picture: Image.Image = load_image(Path(path))
        scale = max(1, math.ceil(DRAWING_MIN_SIDE / min(picture.size)))
        picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.Resampling.NEAREST)
        pen = ImageDraw.Draw(picture)
        for detection in found:
            color = PALETTE[detection.label % len(PALETTE)]
            box = [v * scale for v in detection.box]
            pen.rectangle(box, outline=color, width=max(2, round(max(picture.size) / 300)))
            label = f"{detection.query} {detection.score:.2f}"
            corner = (box[0], max(0, box[1] - 12))  # above the box, on a filled strip that keeps it legible
            pen.rectangle(pen.textbbox(corner, label), fill=color)
            pen.text(corner, label, fill=(255, 255, 255))
        stem, number = Path(path).stem, 1
        while folder / f"{stem}{f'-{number}' if number > 1 else ''}.detections.png" in written:
            number += 1
        target = folder / f"{stem}{f'-{number}' if number > 1 else ''}.detections.png"
        with replacing(target, "wb") as handle:
            picture.save(handle, format="PNG")
        written.append(target)
    return written


@dataclass
class DetectOptions:
    image: list[str] = option(help="image files", positional=True)
    queries: str | None = option(None, help='comma-separated texts, e.g. "a red kite,a box"')
    query: list[str] = option(default_factory=list, repeat=True, help="one text query as written, commas and "
                              "all (repeatable)")
    query_image: list[str] = option(default_factory=list, repeat=True, help="an example image of the object to "
                                    "find (one-shot detection; repeat for more examples of it)")
    query_box: list[str] = option(default_factory=list, repeat=True, help="x0,y0,x1,y1: the object in each "
                                  "--query-image, in its pixels")
    templates: str | None = option(None, help="prompt templates file, one per line with {} (their logits are "
                                   "averaged; default: those the detector was trained with)")
    threshold: Fraction = option(0.1, help="keep boxes scoring at least this")
    top_k: PositiveInt | None = option(None, help="keep at most this many boxes per image")
    nms: Fraction = option(NMS_IOU, metavar="IOU", help="drop boxes overlapping a better one above this IoU "
                           "(1: keep all)")
    out: str | None = option(None, help="write the detections JSON here (boxes in each image's pixels)")
    draw: str | None = option(None, metavar="DIR", help="write each image with its boxes drawn into this folder")


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ConfigError(f"--query-box {text!r}: expected x0,y0,x1,y1 in the query image's pixels")
    return box


def _detect_command(functions: FunctionsFactory, options: DetectOptions) -> None:
    queries = [q.strip() for q in (options.queries or "").split(",") if q.strip()] + options.query
    if bool(queries) == bool(options.query_image):
        raise ConfigError('vlp detect needs --queries "a red kite,a box" (or --query) or --query-image with '
                          "--query-box, not both")
    if len(options.query_box) != len(options.query_image):
        raise ConfigError(f"{len(options.query_image)} --query-image for {len(options.query_box)} --query-box: each "
                          "example image needs the box x0,y0,x1,y1 of the object it shows")
    templates = check_templates(read_lines(options.templates), options.templates) if options.templates else []
    # Repeated --query-image/--query-box pairs are examples of one thing: one query, their mean.
    request = DetectRequest(options.image, queries, options.query_image, [_parse_box(b) for b in options.query_box],
                            one_query=True, templates=templates, threshold=options.threshold, top_k=options.top_k,
                            nms=options.nms)
    results = detect(functions({}), request).detections
    records = [{"image": str(path), "detections": [asdict(d) for d in found]}
               for path, found in zip(options.image, results, strict=True)]
    for record in records:
        best = ", ".join(f"{d['query']} {d['score']:.2f} at {d['box']}" for d in record["detections"][:3])
        print(f"{record['image']}: {len(record['detections'])} boxes" + (f" ({best}...)" if best else ""))
    if options.out:
        write_text(options.out, json.dumps(records, indent=1))
    if options.draw:
        for path in draw_detections(options.image, results, options.draw):
            print(f"drawn: {path}")


@dataclass
class DetectionEvalConfig:
    data: str = option(help="COCO instances JSON: every category name is a query")
    images: str | None = option(None, help="folder the image file names resolve against (default: beside --data)")
    novel: list[str] = option(default_factory=list, help="classes without boxes in training: their AP is reported "
                              "apart")
    templates: str | None = option(None, help="prompt templates file, one per line with {} (their logits are "
                                   "averaged; default: those the detector was trained with)")
    max_detections: PositiveInt = option(100, help="(box, class) pairs kept per image")
    limit: PositiveInt | None = option(None, help="evaluate the first N images only")
    one_shot: str | None = option(None, metavar="INSTANCES", help="query each class by example boxes from this "
                                  "COCO instances file instead of by its name")
    one_shot_images: str | None = option(None, help="folder the example images resolve against")
    shots: PositiveInt = option(1, help="example boxes per class (their embeddings averaged)")


def evaluate_detection(functions: Any, cfg: DetectionEvalConfig) -> EvalResult:
    box_scores = functions.require("box_scores")
    names = category_names(cfg.data)
    if cfg.one_shot:
        queries = one_shot_queries(functions.require("embed_image_queries"), cfg.one_shot, names,
                                   images_dir=cfg.one_shot_images, shots=cfg.shots)
    else:
        templates = check_templates(read_lines(cfg.templates), cfg.templates) if cfg.templates else None
        queries = functions.require("embed_queries")(names, templates)
    result = evaluate_boxes(box_scores, queries, cfg.data, images_dir=cfg.images, novel=cfg.novel,
                            max_detections=cfg.max_detections, limit=cfg.limit)
    if not cfg.one_shot:
        result.protocol += (f"; {queries.shape[0]} prompt templates from {cfg.templates}" if cfg.templates else
                            f"; the detector's own {queries.shape[0]} prompt template(s)")
    if cfg.one_shot:
        result.protocol += f"; one-shot image queries, {cfg.shots} example box(es) per class from {cfg.one_shot}"
    return result


TASK = Task(
    name="detection",
    route="detect",
    abilities=((DetectsBoxes,),),
    functions=(
        PredictFunction("detect", DetectionPredictor, lambda f, images: [
            [(d.box, d.score, d.label) for d in found]
            for found in f.detect(images, EXAMPLE_TEXTS, threshold=0.0, top_k=5)]),
        PredictFunction("embed_queries", DetectionPredictor,
                        lambda f, _: f.embed_queries(EXAMPLE_TEXTS, ["{}", "a {}."])),
        PredictFunction("embed_image_queries", DetectionPredictor, lambda f, images: f.embed_image_queries(
            images[:2], [(4, 4, 30, 30), (10, 20, 60, 50)])),
        PredictFunction("box_scores", DetectionPredictor, lambda f, images: torch.cat(
            [torch.cat(pair, dim=1) for pair in f.box_scores(images, f.embed_queries(EXAMPLE_TEXTS))])),
    ),
    request=DetectRequest,
    response=DetectResponse,
    respond=detect,
    example_request=lambda images: DetectRequest(images, EXAMPLE_TEXTS[:2], threshold=0.0, top_k=3),
    # The evaluation shows one progress bar over its images, not one per detector call.
    evaluation=Evaluation("detection", "open-vocabulary detection: COCO AP (pycocotools)", DetectionEvalConfig,
                          evaluate_detection, lambda _: {DetectionPredictor: {"progress": False}}),
    commands=(Command("detect", "detect objects named by text or shown by an example", DetectOptions,
                      _detect_command),),
    training=BOXES,
)
