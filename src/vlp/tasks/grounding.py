"""Grounding referring expressions: the box of the object an expression names. A detector answers with its
best box for the expression as a query; a model with an image-text matching head chooses among candidate
regions. Evaluated by precision@1 on RefCOCO-layout files (`vlp.evals.grounding`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlp.abilities import DetectsBoxes, MatchesImageText
from vlp.config import PositiveInt
from vlp.data.grounding import ReferringExpression, read_referring_expressions
from vlp.errors import BadQuery
from vlp.evals import EvalResult
from vlp.evals.grounding import Box, detector_grounding, evaluate_grounding, region_scoring_grounding
from vlp.flags import option
from vlp.tasks.base import Evaluation, Task


def grounding_method(functions: Any) -> tuple[Any, str]:
    """How the model grounds an expression, and that said in words: by detection when it detects, else by
    matching annotated regions when it has a matching head."""
    if functions.box_scores is not None:
        return (detector_grounding(functions.box_scores, functions.embed_queries),
                "the detector's top-scoring box for the expression")
    if functions.match_probabilities is not None:
        return (region_scoring_grounding(functions.match_probabilities),
                "the image-text matching head's best-scoring annotated region (cropped)")
    functions.require("box_scores")  # names what the model lacks
    raise AssertionError("unreachable")


@dataclass
class GroundRequest:
    """Expressions about one image; a model that matches rather than detects chooses among `regions`."""

    image: str = option(help="the image file", image=True)
    expressions: list[str] = option(help="referring expressions")
    regions: list[list[float]] = option(default_factory=list, help="candidate regions, x0, y0, x1, y1 in pixels")


@dataclass
class GroundResponse:
    boxes: list[list[float]]  # per expression, x0, y0, x1, y1 in the image's pixels


def ground(functions: Any, request: GroundRequest) -> GroundResponse:
    if not request.expressions:
        raise BadQuery("no expressions: give at least one")
    method, _ = grounding_method(functions)
    if functions.box_scores is None and not request.regions:
        raise BadQuery("this model grounds by choosing among candidate regions: give regions")
    regions: list[Box] = [tuple(r) for r in request.regions]
    # The image as given: a file name, or an image a caller decoded (the service's).
    image = request.image if isinstance(request.image, Image.Image) else Path(request.image)
    expressions = [ReferringExpression(image, sentence, (0.0, 0.0, 0.0, 0.0), regions, index, "")
                   for index, sentence in enumerate(request.expressions)]
    return GroundResponse([list(box) for box in method(expressions)])


@dataclass
class GroundingEvalConfig:
    refs: str = option(help="RefCOCO-layout refs pickle, e.g. refcoco/refs(unc).p")
    instances: str | None = option(None, help="its COCO instances JSON (default: instances.json beside --refs)")
    images: str | None = option(None, help="folder the image file names resolve against")
    split: str | None = option(None, help="the refs' split to evaluate (val, testA, ...; default: all)")
    limit: PositiveInt | None = option(None, help="the first N expressions only")


def evaluate(functions: Any, cfg: GroundingEvalConfig) -> EvalResult:
    method, described = grounding_method(functions)
    expressions = read_referring_expressions(cfg.refs, cfg.instances, images_dir=cfg.images, split=cfg.split)
    expressions = expressions[: cfg.limit] if cfg.limit else expressions
    return evaluate_grounding(method, expressions, method=described, dataset=f"{cfg.refs} ({cfg.split or 'all'})")


TASK = Task(
    name="grounding",
    route="ground",
    abilities=((DetectsBoxes,), (MatchesImageText,)),
    request=GroundRequest,
    response=GroundResponse,
    respond=ground,
    example_request=lambda images: GroundRequest(images[0], ["the red circle", "the blue square"],
                                                 [[2.0, 2.0, 30.0, 30.0], [20.0, 20.0, 60.0, 60.0]]),
    evaluation=Evaluation("grounding", "referring expressions: precision@1 (IoU >= 0.5) of a detector, or of an "
                          "image-text matching model over the annotated regions", GroundingEvalConfig, evaluate),
)
