"""Captioning: text generated from an image (greedy, beam search or nucleus sampling; `vlp.generation`),
evaluated with the COCO caption evaluation (`vlp.evals.captioning`: BLEU, METEOR, ROUGE-L, CIDEr)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlp.abilities import CaptionsImages
from vlp.checkpoint import Pretrained
from vlp.data.pipeline import IMAGE_TEXT_PAIRS
from vlp.data.sources import read_captions
from vlp.evals.captioning import PROTOCOLS, caption_metrics
from vlp.flags import option
from vlp.generation import GenerationConfig, generate
from vlp.tasks.base import (
    Command,
    EvalResult,
    Evaluation,
    FunctionsFactory,
    ImageInput,
    PredictFunction,
    Predictor,
    Task,
    per_item,
)


class CaptionPredictor(Predictor):
    """`caption(images)` for a captioning model: generated text, the prompt removed."""

    abilities = (CaptionsImages,)
    task = "caption images"

    def __init__(self, pretrained: Pretrained, *, generation: GenerationConfig | None = None, prompt: str = "",
                 **kwargs: Any):
        super().__init__(pretrained, **kwargs)
        self.generation = generation or GenerationConfig()
        ids, mask = self.tokenizer(prompt)
        # The prompt's own tokens: without the start token the decoder replaces, and without end-of-text.
        self.prompt = ids[0, 1 : int(mask.sum()) - 1] if prompt else ids[0, :0]

    @per_item(1)
    @torch.no_grad()
    def caption(self, images: Sequence[ImageInput], *, generation: GenerationConfig | None = None) -> list[str]:
        """Captions of the images, generated as `generation` (default: the predictor's) says."""
        generation = generation or self.generation
        captions = []
        for pixels in self.pixel_batches(images, "captioning"):
            with self.autocast:
                decoder = self.model.caption_decoder(self.model.encode_image_tokens(pixels)[1])
                prompt = self.prompt.to(self.device).expand(len(pixels), -1)
                captions += [self.tokenizer.decode(ids) for ids in generate(decoder, prompt, generation)]
        return captions


@dataclass
class CaptionRequest:
    images: list[str] = option(help="image files", positional=True, metavar="image", image=True)
    generation: GenerationConfig = option(default_factory=GenerationConfig, help="how captions are generated")
    prompt: str = option("", help='a caption prefix such as "a picture of"')


@dataclass
class CaptionResponse:
    captions: list[str]


def caption(functions: Any, request: CaptionRequest) -> CaptionResponse:
    return CaptionResponse(functions.require("caption")(request.images, generation=request.generation))


def _options(request: Any) -> dict[type[Predictor], dict[str, Any]]:
    return {CaptionPredictor: {"generation": request.generation, "prompt": request.prompt}}


def _caption_command(functions: FunctionsFactory, request: CaptionRequest) -> None:
    response = caption(functions(_options(request)), request)
    for path, text in zip(request.images, response.captions, strict=True):
        print(f"{path}: {text}")


@dataclass
class CaptioningEvalConfig:
    data: str = option(help="COCO captions JSON or CSV (references per image)")
    images: str | None = option(None, help="folder the image paths resolve against")
    meteor: bool = option(True, help="score METEOR too (it starts Java; --no-meteor skips it)")
    tokenizer: Literal["ptb", "simple"] = option(
        "ptb", help="ptb: the COCO caption evaluation's PTB tokeniser (Java), as papers report; simple: a regex "
        "without Java, whose scores differ on hyphens, apostrophes, decimals and accents")
    generation: GenerationConfig = option(default_factory=GenerationConfig, help="how captions are generated")
    prompt: str = option("", help='a caption prefix such as "a picture of"')


def evaluate_captioning(functions: Any, cfg: CaptioningEvalConfig) -> EvalResult:
    """Caption every image of a COCO-format (or CSV) caption file and score against its captions."""
    generate_captions = functions.require("caption")
    items = read_captions(str(cfg.data), images_dir=cfg.images)
    candidates = generate_captions([item.path for item in items])
    metrics = caption_metrics([item.captions for item in items], candidates, meteor=cfg.meteor,
                              tokenizer=cfg.tokenizer)
    return EvalResult("captioning", str(cfg.data), metrics, protocol=PROTOCOLS[cfg.tokenizer], details={
        "unavailable": {"spice": "needs Stanford CoreNLP, which its scorer downloads"},
        "captions": [{"image": str(item.path), "caption": c} for item, c in zip(items, candidates, strict=True)],
    })


TASK = Task(
    name="captioning",
    route="caption",
    abilities=((CaptionsImages,),),
    functions=(PredictFunction("caption", CaptionPredictor, lambda f, images: f.caption(images)),),
    request=CaptionRequest,
    response=CaptionResponse,
    respond=caption,
    request_options=_options,
    example_request=lambda images: CaptionRequest(images),
    evaluation=Evaluation("captioning", "captioning: BLEU, METEOR, ROUGE-L, CIDEr", CaptioningEvalConfig,
                          evaluate_captioning, _options),
    commands=(Command("caption", "caption images", CaptionRequest, _caption_command),),
    training=IMAGE_TEXT_PAIRS,
)
