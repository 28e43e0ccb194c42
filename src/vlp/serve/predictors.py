"""Predict functions over a loaded checkpoint. Evaluators, CapFilt and servers see these, never the model.

Each predictor needs abilities (`vlp.abilities`) that the checkpoint's family declares in the registry;
`predict_functions` gives every predict function a checkpoint's abilities allow, in one object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tqdm import tqdm

from vlp.abilities import (
    Ability,
    AnswersQuestions,
    CaptionsImages,
    DetectsBoxes,
    EmbedsImages,
    EmbedsTexts,
    FollowsInstructions,
    GivesImageTokens,
    JudgesImagePairs,
    MatchesImageText,
)
from vlp.assets import INSTRUCTION
from vlp.assets.image import boxes_to_image, boxes_to_input
from vlp.assets.tokenizer import tokenize_trimmed
from vlp.checkpoint import Pretrained
from vlp.config import ConfigError
from vlp.data.sources import load_image
from vlp.errors import BadQuery, NonFiniteOutput, UnsupportedTask
from vlp.evals.zeroshot import zeroshot_classifier
from vlp.generation import GenerationConfig, generate
from vlp.geometry import box_cxcywh_to_xyxy, non_maximum_suppression
from vlp.losses import sequence_losses
from vlp.precision import Precision, default_device, resolve_precision

ImageInput = Image.Image | str | Path


def batch_starts(total: int, batch_size: int, progress: str | None = None) -> Iterable[int]:
    """The first index of every batch; with `progress`, under a progress bar of that name when there is
    more than one batch."""
    starts = range(0, total, batch_size)
    return tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None or len(starts) < 2)


def pixel_batches(
    images: Sequence[ImageInput],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    device: torch.device,
    *,
    progress: str | None = None,
) -> Iterator[torch.Tensor]:
    """Images (PIL or paths) -> preprocessed pixel batches [b, 3, S, S] on `device`; with `progress`, a
    progress bar of that name when there is more than one batch."""
    for start in batch_starts(len(images), batch_size, progress):
        chunk = [
            im if isinstance(im, Image.Image) else load_image(Path(im)) for im in images[start : start + batch_size]
        ]
        yield torch.stack([transform(im) for im in chunk]).to(device)


class Predictor:
    """What every predictor shares: the model on its device in eval mode, its preprocessing and
    tokenizer, batching, bf16 autocast as an option and progress bars as another.

    `abilities` are what the model must be able to do (its family declares them in the registry) and
    `task` what the predictor does, for the error a checkpoint of another kind gets.
    """

    abilities: tuple[type[Ability], ...] = ()
    task: str = ""

    def __init__(
        self,
        pretrained: Pretrained,
        *,
        batch_size: int = 32,
        device: str | None = None,
        precision: Precision = "fp32",
        progress: bool = False,
    ):
        missing = self.missing_ability(pretrained)
        if missing:
            raise UnsupportedTask(f"{pretrained.path}: a {pretrained.family.name} model cannot {self.task} ({missing})")
        self.pretrained = pretrained
        self.device = torch.device(device) if device else default_device()
        self.model = pretrained.model.to(self.device).eval()
        self.transform = pretrained.image_transform()
        self.tokenizer = pretrained.tokenizer
        self.batch_size = batch_size
        self.progress = progress
        # bf16 runs the model under bf16 autocast: about twice as fast on CPUs with bf16 matmuls. Predictors
        # run under no_grad, not inference_mode: autocast keeps one bf16 copy of each weight per call only
        # outside inference mode, and without it a decoder re-casts every weight for every token.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=resolve_precision(precision, self.device) == "bf16")

    @classmethod
    def missing_ability(cls, pretrained: Pretrained) -> str | None:
        """None when the model can do this predictor's task, else what it lacks."""
        missing = [ability.__name__ for ability in cls.abilities if not pretrained.family.can(ability)]
        return f"its family does not declare {', '.join(missing)}" if missing else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs):
        """Any checkpoint `vlp.load` reads: vlp, Hugging Face or open_clip folders."""
        from vlp.convert import load_pretrained

        return cls(load_pretrained(path), **kwargs)

    def pixel_batches(self, images: Sequence[ImageInput], what: str) -> Iterator[torch.Tensor]:
        return pixel_batches(images, self.transform, self.batch_size, self.device,
                             progress=what if self.progress else None)


class DualEncoderPredictor(Predictor):
    """`embed_images` and `embed_texts` for a dual encoder: L2-normalised float32 embeddings (bf16:
    within ~1e-2 of fp32)."""

    abilities = (EmbedsImages, EmbedsTexts)
    task = "embed images and texts"

    def __init__(self, pretrained: Pretrained, *, batch_size: int = 256, **kwargs):
        super().__init__(pretrained, batch_size=batch_size, **kwargs)

    @torch.no_grad()
    def _per_image_batch(
        self, images: Sequence[ImageInput], encode: Callable[[torch.Tensor], torch.Tensor], empty: tuple[int, ...]
    ) -> torch.Tensor:
        out = []
        for pixels in self.pixel_batches(images, "embedding images"):
            with self.autocast:
                out.append(encode(pixels).float().cpu())
        return torch.cat(out) if out else torch.empty(empty)

    def _finite(self, embeddings: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.isfinite(embeddings).all():
            raise NonFiniteOutput(f"{self.pretrained.path}: the model's {what} embeddings are NaN or infinite "
                                  "(did its training diverge?)")
        return embeddings

    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL or paths) -> [N, E]."""
        return self._finite(self._per_image_batch(images, self.model.encode_image, (0, 0)), "image")

    def embed_image_tokens(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> the image encoder's output tokens [N, T, D], before any pooling (for frozen-feature probes);
        the model must also give image tokens (`GivesImageTokens`)."""
        if not self.pretrained.family.can(GivesImageTokens):
            raise UnsupportedTask(f"{self.pretrained.path}: a {self.pretrained.family.name} model cannot give image "
                                  "tokens (its family does not declare GivesImageTokens)")
        return self._per_image_batch(images, self.model.image_tokens, (0, 0, 0))

    def zeroshot_classifier(self, classnames: list[str], templates: list[str]) -> Callable[[Sequence[ImageInput]], torch.Tensor]:
        """A function of images -> class probabilities [N, C], from the logits the zero-shot evaluation scores."""
        logits = zeroshot_classifier(self.embed_images, self.embed_texts, classnames, templates)
        return lambda images: logits(images).softmax(dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [N, E]. Batches are cut from the texts sorted by length: a causal text tower computes
        only up to each batch's longest text, so similar lengths together waste little on padding."""
        if not texts:
            return torch.empty(0, 0)
        ids, mask = self.tokenizer(list(texts))
        order = mask.sum(dim=1).argsort(stable=True)
        out = []
        for start in batch_starts(len(texts), self.batch_size, "embedding texts" if self.progress else None):
            rows = order[start : start + self.batch_size]
            with self.autocast:
                out.append(self.model.encode_text(ids[rows].to(self.device), mask[rows].to(self.device)).float().cpu())
        embeddings = torch.empty(len(texts), out[0].shape[1])
        embeddings[order] = torch.cat(out)
        return self._finite(embeddings, "text")


class CaptionPredictor(Predictor):
    """`caption(images)` for a captioning model (BLIP, CoCa): generated text, the prompt removed."""

    abilities = (CaptionsImages,)
    task = "caption images"

    def __init__(self, pretrained: Pretrained, *, generation: GenerationConfig | None = None, prompt: str = "",
                 **kwargs):
        super().__init__(pretrained, **kwargs)
        self.generation = generation or GenerationConfig()
        ids, mask = self.tokenizer(prompt)
        # The prompt's own tokens: without the start token the decoder replaces, and without end-of-text.
        self.prompt = ids[0, 1 : int(mask.sum()) - 1] if prompt else ids[0, :0]

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


class MatchingPredictor(DualEncoderPredictor):
    """The embeddings plus the image-text matching head (BLIP's ITM) for re-ranking."""

    abilities = (EmbedsImages, EmbedsTexts, MatchesImageText)
    task = "match images and texts (an image-text matching head re-ranks)"

    @torch.no_grad()
    def match_probabilities(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """p(match) [N] of each aligned pair (images[i], texts[i]) from the ITM head's two-way softmax."""
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        out = []
        for start, pixels in zip(
            range(0, len(images), self.batch_size), self.pixel_batches(images, "matching"), strict=True
        ):
            ids, mask = self.tokenizer(list(texts[start : start + self.batch_size]))
            with self.autocast:
                tokens = self.model.encode_image_tokens(pixels)[1]
                logits = self.model.itm_logits(ids.to(self.device), mask.to(self.device), tokens)
            out.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def matcher(
        self, images: Sequence[ImageInput], texts: Sequence[str]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function of pairs (image_indices [P], text_indices [P]) -> ITM match logits [P] of
        (images[i], texts[t]). Image tokens and text ids are computed once, here, and kept in memory."""
        tokens = []
        for pixels in self.pixel_batches(images, "image tokens"):
            with self.autocast:
                tokens.append(self.model.encode_image_tokens(pixels)[1])
        all_tokens = torch.cat(tokens)
        ids, mask = self.tokenizer(list(texts))

        @torch.no_grad()
        def match_logits(image_indices: torch.Tensor, text_indices: torch.Tensor) -> torch.Tensor:
            out = []
            for start in batch_starts(len(image_indices), self.batch_size, "re-ranking" if self.progress else None):
                pair_images = image_indices[start : start + self.batch_size].to(self.device)
                pair_texts = text_indices[start : start + self.batch_size]
                with self.autocast:
                    logits = self.model.itm_logits(
                        ids[pair_texts].to(self.device), mask[pair_texts].to(self.device), all_tokens[pair_images]
                    )
                out.append(logits[:, 1].float().cpu())
            return torch.cat(out)

        return match_logits


class VqaPredictor(Predictor):
    """`answer(images, questions)` for models that answer questions (BLIP-VQA, BLIP-2, InstructBLIP), by
    generation (beam search) or by ranking a list of candidate answers as BLIP reports its numbers: every
    candidate's first token is scored at the [DEC] step, the best `k` are re-scored by their whole
    log-likelihood, the best one is the answer. `score_answers(images, questions, candidates)` gives each
    question's own candidates their log-likelihood (InstructBLIP's vocabulary ranking for closed tasks).

    A model that follows instructions (InstructBLIP) gets each question in its Q-Former's tokens too. An
    image may be a list of images (an image pair): every question of a batch then has as many."""

    abilities = (AnswersQuestions,)
    task = "answer questions"

    def __init__(
        self,
        pretrained: Pretrained,
        *,
        method: Literal["generate", "rank"] = "generate",
        answer_list: Sequence[str] = (),
        k: int = 128,
        generation: GenerationConfig | None = None,
        question_template: str | None = None,
        **kwargs,
    ):
        """question_template: how questions are put to the model ("{}" is the question), the model's own
        when None."""
        super().__init__(pretrained, **kwargs)
        self.question_template = question_template or self.model.question_template
        if "{}" not in self.question_template:
            raise ConfigError(f"question template {self.question_template!r} has no {{}} where the question goes")
        if method == "rank" and not answer_list:
            raise ValueError("ranked answering needs a list of candidate answers")
        self.qformer_tokenizer = None
        if pretrained.family.can(FollowsInstructions):
            self.qformer_tokenizer = pretrained.assets.tokenizer(INSTRUCTION, where=pretrained.path)
        self.method, self.k = method, k
        # BLIP's VQA generation: beam 3, at most 10 tokens.
        self.generation = generation or GenerationConfig(
            method="beam", num_beams=3, max_new_tokens=10, min_new_tokens=1
        )
        self.answer_list = list(answer_list)
        if self.answer_list:
            ids, mask = tokenize_trimmed(self.tokenizer, self.answer_list)
            self.candidates, self.candidate_mask = ids.to(self.device), mask.to(self.device)

    def _pixels(self, items: Sequence[ImageInput | Sequence[ImageInput]]) -> torch.Tensor:
        """[b, 3, S, S], or [b, F, 3, S, S] when every item is a list of F images."""
        def pixels(image: ImageInput) -> torch.Tensor:
            return self.transform(image if isinstance(image, Image.Image) else load_image(Path(image)))

        lists = [isinstance(item, (list, tuple)) for item in items]
        if not any(lists):
            return torch.stack([pixels(item) for item in items]).to(self.device)
        if not all(lists) or len({len(item) for item in items}) > 1:
            raise ValueError("every question of a batch needs the same number of images")
        return torch.stack([torch.stack([pixels(image) for image in item]) for item in items]).to(self.device)

    def _question_batches(
        self, images: Sequence[Any], questions: Sequence[str], what: str, template: str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(pixels, question ids, mask, the instruction in the Q-Former's tokens when the model reads it) a batch
        at a time, each question put through `template` (the predictor's question template by default)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        template = template or self.question_template
        for start in batch_starts(len(images), self.batch_size, what if self.progress else None):
            texts = [template.replace("{}", q) for q in questions[start : start + self.batch_size]]
            # A long question or instruction loses its start, not its end (LAVIS truncates on the left).
            ids, mask = tokenize_trimmed(self.tokenizer.truncating_left(), texts)
            instruction = {}
            if self.qformer_tokenizer is not None:
                qids, qmask = tokenize_trimmed(self.qformer_tokenizer.truncating_left(), texts)
                instruction = {"instruction": qids.to(self.device), "instruction_mask": qmask.to(self.device)}
            yield (self._pixels(images[start : start + self.batch_size]), ids.to(self.device), mask.to(self.device),
                   instruction)

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        return self._answer(images, questions)

    def follow_instructions(self, images: Sequence[Any], instructions: Sequence[str]) -> list[str]:
        """InstructBLIP: each instruction given as written (no question template), the answer generated or
        ranked as `method` says."""
        return self._answer(images, instructions, "{}")

    @torch.no_grad()
    def _answer(self, images: Sequence[Any], questions: Sequence[str], template: str | None = None) -> list[str]:
        answers = []
        for pixels, ids, mask, instruction in self._question_batches(images, questions, "answering", template):
            with self.autocast:
                states = self.model.encode_question(pixels, ids, mask, **instruction)
                if self.method == "rank":
                    answers += self._rank(states, mask)
                else:
                    decoder = self.model.answer_decoder_for(states, mask)
                    prompt = ids.new_empty(len(ids), 0)
                    answers += [self.tokenizer.decode(a) for a in generate(decoder, prompt, self.generation)]
        return answers

    def _rank(self, states: torch.Tensor, mask: torch.Tensor) -> list[str]:
        batch, k = len(states), min(self.k, len(self.answer_list))
        decoder = self.model.answer_decoder_for(states, mask)
        start = decoder.start_tokens(states.new_empty(batch, 0, dtype=torch.long))
        first = decoder(start, torch.ones_like(start)).float().log_softmax(dim=-1)  # [B, V]
        top = first[:, self.candidates[:, 1]].topk(k, dim=1).indices  # [B, k]
        rows = torch.arange(batch, device=self.device).repeat_interleave(k)
        candidates, candidate_mask = self.candidates[top.view(-1)], self.candidate_mask[top.view(-1)]
        logits = self.model.answer_logits(candidates, candidate_mask, states[rows], mask[rows])
        loglik = -sequence_losses(logits, candidates, candidate_mask).view(batch, k)
        best = top.gather(1, loglik.argmax(dim=1, keepdim=True)).squeeze(1)
        return [self.answer_list[i] for i in best.tolist()]

    @torch.no_grad()
    def score_answers(
        self, images: Sequence[Any], questions: Sequence[str], candidates: Sequence[Sequence[str | Sequence[str]]]
    ) -> list[list[float]]:
        """Each question's candidates scored by their summed log-likelihood as the answer (no length
        normalisation, as LAVIS's `predict_class`). A candidate given as a list of words (a label and its
        verbalizers: ["yes", "true"]) scores as its best word."""
        if len(candidates) != len(questions):
            raise ValueError(f"{len(candidates)} candidate lists for {len(questions)} questions")
        scores: list[list[float]] = []
        for pixels, ids, mask, instruction in self._question_batches(images, questions, "ranking"):
            first = len(scores)
            labels = [[[c] if isinstance(c, str) else list(c) for c in options]
                      for options in candidates[first : first + len(ids)]]
            flat = [(row, label, word) for row, options in enumerate(labels)
                    for label, words in enumerate(options) for word in words]
            with self.autocast:
                states = self.model.encode_question(pixels, ids, mask, **instruction)
                loglik = []
                for start in range(0, len(flat), self.batch_size * 8):
                    chunk = flat[start : start + self.batch_size * 8]
                    answer, answer_mask = tokenize_trimmed(self.tokenizer, [word for _, _, word in chunk])
                    answer, answer_mask = answer.to(self.device), answer_mask.to(self.device)
                    rows = torch.tensor([row for row, _, _ in chunk], device=self.device)
                    logits = self.model.answer_logits(answer, answer_mask, states[rows], mask[rows])
                    loglik += (-sequence_losses(logits, answer, answer_mask)).tolist()
            best = [[-math.inf] * len(options) for options in labels]
            for (row, label, _), value in zip(flat, loglik, strict=True):
                best[row][label] = max(best[row][label], value)
            scores += best
        return scores


class NlvrPredictor(Predictor):
    """`true_probability(lefts, rights, sentences)` for BLIP-NLVR: p(statement is true of the pair)."""

    abilities = (JudgesImagePairs,)
    task = "judge statements about image pairs"

    @torch.no_grad()
    def true_probability(
        self, lefts: Sequence[ImageInput], rights: Sequence[ImageInput], sentences: Sequence[str]
    ) -> torch.Tensor:
        if not len(lefts) == len(rights) == len(sentences):
            raise ValueError(f"{len(lefts)} left images, {len(rights)} right images, {len(sentences)} sentences")
        out = []
        batches = zip(
            range(0, len(lefts), self.batch_size),
            self.pixel_batches(lefts, "judging pairs"),
            pixel_batches(rights, self.transform, self.batch_size, self.device),
            strict=True,
        )
        for start, left, right in batches:
            ids, mask = self.tokenizer(list(sentences[start : start + self.batch_size]))
            with self.autocast:
                logits = self.model.pair_logits(left, right, ids.to(self.device), mask.to(self.device))
            out.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.empty(0)


@dataclass
class Detection:
    box: list[float]  # x0, y0, x1, y1 in the original image's pixels
    score: float  # sigmoid of the box's logit for its query
    label: int  # index of the query
    query: str  # the query's text, or "image query N"


class DetectionPredictor(Predictor):
    """Open-vocabulary detection (OWL-ViT): text queries (prompt ensembles average the logits over
    templates, as scenic's evaluator) or image queries (an example image and a box). Boxes come back in
    the original images' pixels, whatever the resize (padding, squashing) the weights were trained with."""

    abilities = (DetectsBoxes,)
    task = "detect objects"

    def __init__(self, pretrained: Pretrained, *, batch_size: int = 8, **kwargs):
        super().__init__(pretrained, batch_size=batch_size, **kwargs)

    @torch.no_grad()
    def embed_queries(self, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """Texts -> query embeddings [T, Q, E], one row per template."""
        if not texts:
            raise BadQuery("no queries: give at least one text (or an image query)")
        prompts = [template.format(text) for template in templates for text in texts]
        ids, mask = self.tokenizer(prompts)
        with self.autocast:
            embeddings = self.model.embed_queries(ids.to(self.device), mask.to(self.device)).float()
        return embeddings.view(len(templates), len(texts), -1)

    def _pixels(self, image: ImageInput) -> tuple[torch.Tensor, int, int]:
        picture = image if isinstance(image, Image.Image) else load_image(Path(image))
        return self.transform(picture), picture.size[0], picture.size[1]

    @torch.no_grad()
    def embed_image_queries(self, images: Sequence[ImageInput], boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """Example images, each with the pixel box (x0, y0, x1, y1) of the object it shows -> [N, E]: the
        class embedding of the token that predicts that object (OWL-ViT's one-shot queries)."""
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

    def detect(
        self,
        images: Sequence[ImageInput],
        queries: Sequence[str] = (),
        *,
        query_embeddings: torch.Tensor | None = None,
        templates: Sequence[str] = ("{}",),
        threshold: float = 0.1,
        top_k: int | None = None,
        nms: float | None = None,
    ) -> list[list[Detection]]:
        """Boxes for text `queries` (or `query_embeddings` [Q, E] from image queries): per image, every token
        whose best query scores at least `threshold`, labelled with that query, best first; `nms` an IoU
        above which lower-scoring boxes are dropped (off by default: OWL-ViT predicts a set)."""
        if query_embeddings is None:
            query_embeddings = self.embed_queries(queries, templates)
            names = list(queries)
        else:
            names = [f"image query {i}" for i in range(query_embeddings.shape[-2])]
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
class PredictFunctions:
    """Every predict function a checkpoint's abilities allow, the others None: what the CLI, the evaluators,
    CapFilt and the HTTP service call. `require(name)` gives one or says why the model cannot."""

    pretrained: Pretrained
    embed_images: Callable[[Sequence[ImageInput]], torch.Tensor] | None = None
    embed_texts: Callable[[Sequence[str]], torch.Tensor] | None = None
    embed_image_tokens: Callable[[Sequence[ImageInput]], torch.Tensor] | None = None
    zeroshot_classifier: Callable[[list[str], list[str]], Callable[[Sequence[ImageInput]], torch.Tensor]] | None = None
    caption: Callable[[Sequence[ImageInput]], list[str]] | None = None
    match_probabilities: Callable[[Sequence[ImageInput], Sequence[str]], torch.Tensor] | None = None
    matcher: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None
    answer: Callable[[Sequence[ImageInput], Sequence[str]], list[str]] | None = None
    score_answers: Callable[..., list[list[float]]] | None = None
    follow_instructions: Callable[[Sequence[ImageInput], Sequence[str]], list[str]] | None = None
    true_probability: Callable[..., torch.Tensor] | None = None
    detect: Callable[..., list[list[Detection]]] | None = None
    embed_queries: Callable[..., torch.Tensor] | None = None
    embed_image_queries: Callable[..., torch.Tensor] | None = None
    box_scores: Callable[..., list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def require(self, name: str) -> Callable[..., Any]:
        function = getattr(self, name)
        if function is None:
            predictor, _ = FUNCTIONS[name]
            missing = [a.__name__ for a in abilities_of(name) if not self.pretrained.family.can(a)]
            # The predictor's task when the model lacks the predictor's abilities, else the function's own.
            task = predictor.task if predictor.missing_ability(self.pretrained) else name.replace("_", " ")
            raise UnsupportedTask(
                f"{self.pretrained.path}: a {self.pretrained.family.name} model cannot {task} "
                f"(its family does not declare {', '.join(missing)})"
            )
        return function


# Every predict function: the predictor that provides it, and the abilities it needs beyond the predictor's.
FUNCTIONS: dict[str, tuple[type[Predictor], tuple[type[Ability], ...]]] = {
    "embed_images": (DualEncoderPredictor, ()),
    "embed_texts": (DualEncoderPredictor, ()),
    "embed_image_tokens": (DualEncoderPredictor, (GivesImageTokens,)),
    "zeroshot_classifier": (DualEncoderPredictor, ()),
    "caption": (CaptionPredictor, ()),
    "match_probabilities": (MatchingPredictor, ()),
    "matcher": (MatchingPredictor, ()),
    "answer": (VqaPredictor, ()),
    "score_answers": (VqaPredictor, ()),
    "follow_instructions": (VqaPredictor, (FollowsInstructions,)),
    "true_probability": (NlvrPredictor, ()),
    "detect": (DetectionPredictor, ()),
    "embed_queries": (DetectionPredictor, ()),
    "embed_image_queries": (DetectionPredictor, ()),
    "box_scores": (DetectionPredictor, ()),
}


def abilities_of(function: str) -> tuple[type[Ability], ...]:
    """What a model must be able to do for predict function `function`."""
    predictor, extra = FUNCTIONS[function]
    return (*predictor.abilities, *extra)


def predict_functions(
    pretrained: Pretrained, *, options: dict[type[Predictor], dict[str, Any]] | None = None, **common: Any
) -> PredictFunctions:
    """The predict functions the checkpoint's family has the abilities for. `common` goes to every
    predictor (device, precision, batch_size, progress); `options` to one predictor each
    (`{CaptionPredictor: {"generation": ...}}`)."""
    options = options or {}
    functions = PredictFunctions(pretrained)
    predictors: dict[type[Predictor], Predictor] = {}
    for name, (predictor_cls, _) in FUNCTIONS.items():
        if all(pretrained.family.can(ability) for ability in abilities_of(name)):
            if predictor_cls not in predictors:
                predictors[predictor_cls] = predictor_cls(pretrained, **{**common, **options.get(predictor_cls, {})})
            setattr(functions, name, getattr(predictors[predictor_cls], name))
    return functions
