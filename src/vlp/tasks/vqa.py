"""Visual question answering: answers generated, or ranked from a list of candidates; evaluated with the
official VQA accuracy (`vlp.evals.vqa`, the revision named). Trained on VQAv2-style questions with their
annotators' answers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlp.abilities import AnswersQuestions, FollowsInstructions
from vlp.assets import INSTRUCTION
from vlp.assets.tokenizer import tokenize_trimmed
from vlp.checkpoint import Pretrained
from vlp.config import PositiveInt
from vlp.data.vqa import VQA_ANSWERS, read_vqa
from vlp.errors import BadQuery, ConfigError
from vlp.evals.vqa import read_answer_list, vqa_metrics
from vlp.flags import option
from vlp.generation import GenerationConfig, generate
from vlp.likelihood import sequence_losses
from vlp.tasks.base import (
    Command,
    EvalResult,
    Evaluation,
    FunctionsFactory,
    PredictFunction,
    Predictor,
    Task,
    batch_starts,
    per_item,
)


class VqaPredictor(Predictor):
    """`answer(images, questions)` for models that answer questions, by generation (beam search) or by ranking
    a list of candidate answers as the papers' ranked inference does: every candidate's first token is scored at the
    decoder's first step, the best `k` are re-scored by their whole log-likelihood, the best one is the
    answer. `score_answers(images, questions, candidates)` gives each question's own candidates their
    log-likelihood (the vocabulary ranking of closed instruction tasks).

    A model that follows instructions gets each question in its `instruction` tokenizer's tokens too, for its
    image side. An image may be a list of images (an image pair): every question of a batch then has as many."""

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
            raise BadQuery("ranked answering needs a list of candidate answers")
        self.instruction_tokenizer = None
        if pretrained.family.can(FollowsInstructions):
            self.instruction_tokenizer = pretrained.assets.tokenizer(INSTRUCTION, where=pretrained.path)
        self.method, self.k = method, k
        # The reference VQA generation: beam 3, at most 10 tokens.
        self.generation = generation or GenerationConfig(
            method="beam", num_beams=3, max_new_tokens=10, min_new_tokens=1
        )
        self.answer_list = list(answer_list)
        if self.answer_list:
            ids, mask = tokenize_trimmed(self.tokenizer, self.answer_list)
            self.candidates, self.candidate_mask = ids.to(self.device), mask.to(self.device)

    def _question_batches(
        self, images: Sequence[Any], questions: Sequence[str], what: str, template: str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(pixels, question ids, mask, the instruction in the image side's tokens when the model reads it) a batch
        at a time, each question put through `template` (the predictor's question template by default)."""
        if len(images) != len(questions):
            raise BadQuery(f"{len(questions)} questions for {len(images)} images")
        template = template or self.question_template
        for start in batch_starts(len(images), self.batch_size, what if self.progress else None):
            texts = [template.replace("{}", q) for q in questions[start : start + self.batch_size]]
            # A long question or instruction loses its start, not its end (LAVIS truncates on the left).
            ids, mask = tokenize_trimmed(self.tokenizer.truncating_left(), texts)
            instruction = {}
            if self.instruction_tokenizer is not None:
                qids, qmask = tokenize_trimmed(self.instruction_tokenizer.truncating_left(), texts)
                instruction = {"instruction": qids.to(self.device), "instruction_mask": qmask.to(self.device)}
            yield (self.pixels(images[start : start + self.batch_size]), ids.to(self.device), mask.to(self.device),
                   instruction)

    @per_item(2)
    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        return self._answer(images, questions)

    @per_item(2)
    def follow_instructions(self, images: Sequence[Any], instructions: Sequence[str]) -> list[str]:
        """Each instruction given as written (no question template), the answer generated or
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

    @per_item(3)
    @torch.no_grad()
    def score_answers(
        self, images: Sequence[Any], questions: Sequence[str], candidates: Sequence[Sequence[str | Sequence[str]]]
    ) -> list[list[float]]:
        """Each question's candidates scored by their summed log-likelihood as the answer (no length
        normalisation, as LAVIS's `predict_class`). A candidate given as a list of words (a label and its
        verbalizers: ["yes", "true"]) scores as its best word."""
        if len(candidates) != len(questions):
            raise BadQuery(f"{len(candidates)} candidate lists for {len(questions)} questions")
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


@dataclass
class AskRequest:
    """Questions, each about an image (or a list of images read in order)."""

    images: list[Any] = option(help="image files, one per question", image=True)
    questions: list[str] = option(help="the questions")
    method: Literal["generate", "rank"] = option("generate", help="generate with beam search, or rank `answer_list`")
    answer_list: list[str] = option(default_factory=list, help="candidate answers for method rank")
    k: PositiveInt = option(128, help="candidates re-scored in full by method rank")
    question_template: str | None = option(None, help="how a question is put to the model, {} the question")


@dataclass
class AskResponse:
    answers: list[str]


def _predictor_options(method: str, answer_list: Sequence[str], k: int, question_template: str | None
                       ) -> dict[type[Predictor], dict[str, Any]]:
    if method == "rank" and not answer_list:
        raise ConfigError("--method rank needs --answer-list (a JSON list, or a VQAv2 annotations file)")
    return {VqaPredictor: {"method": method, "answer_list": tuple(answer_list), "k": k,
                           "question_template": question_template}}


def ask(functions: Any, request: AskRequest) -> AskResponse:
    """Answers to the request's questions, by functions made with `request_options(request)`."""
    return AskResponse(functions.require("answer")(request.images, request.questions))


def request_options(request: AskRequest) -> dict[type[Predictor], dict[str, Any]]:
    return _predictor_options(request.method, request.answer_list, request.k, request.question_template)


@dataclass
class AnswerOptions:
    """How questions are answered, as the commands take it (an answer list from a file)."""

    method: Literal["generate", "rank"] = option(
        "generate", help="generate with beam search, or rank a list of candidate answers")
    answer_list: str | None = option(None, help="candidates for --method rank: a JSON list, or a VQAv2 annotations "
                                     "file whose most frequent answers are taken")
    k: PositiveInt = option(128, help="candidates re-scored in full by --method rank")
    question_template: str | None = option(None, help='how a question is put to the model, {} the question '
                                           '(default: the model\'s own, e.g. "Question: {} Answer:")')

    def predictor_options(self) -> dict[type[Predictor], dict[str, Any]]:
        answers = read_answer_list(self.answer_list) if self.answer_list else ()
        return _predictor_options(self.method, answers, self.k, self.question_template)


@dataclass(kw_only=True)
class AskOptions(AnswerOptions):
    image: str = option(help="the image", positional=True)
    question: str = option(help="the question", positional=True)


def _ask_command(functions: FunctionsFactory, options: AskOptions) -> None:
    print(functions(options.predictor_options()).require("answer")([options.image], [options.question])[0])


@dataclass(kw_only=True)
class VqaEvalConfig(AnswerOptions):
    questions: str = option(help="VQAv2 questions JSON")
    annotations: str = option(help="VQAv2 annotations JSON")
    images: str | None = option(None, help="image folder (default: beside the questions file)")
    image_pattern: str | None = option(None, help="image file name with {image_id} and {data_subtype} (default: "
                                       "VQAv2's COCO_{data_subtype}_{image_id:012d}.jpg)")
    official_version: Literal["2021", "2016"] = option(
        "2021", help="the revision of the official vqaEval.py to follow: 2021 (its latest) or 2016 (LAVIS's copy)")


def evaluate_vqa(functions: Any, cfg: VqaEvalConfig) -> EvalResult:
    """Answer every question of a VQAv2-format split and score it; predictions are kept in the official
    results format ([{question_id, answer}])."""
    answer = functions.require("answer")
    questions = read_vqa(cfg.questions, cfg.annotations, images_dir=cfg.images, image_pattern=cfg.image_pattern)
    predictions = answer([q.image for q in questions], [q.question for q in questions])
    return EvalResult(
        "vqa", str(cfg.questions), vqa_metrics(questions, predictions, cfg.official_version),
        protocol=f"official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py), {cfg.official_version} revision",
        details={"predictions": [{"question_id": q.question_id, "answer": a}
                                 for q, a in zip(questions, predictions, strict=True)]},
    )


TASK = Task(
    name="vqa",
    route="ask",
    abilities=((AnswersQuestions,),),
    functions=(PredictFunction("answer", VqaPredictor, lambda f, images: f.answer(
        images[:3], ["what color?", "how many?", "is it red?"][: len(images)])),),
    request=AskRequest,
    response=AskResponse,
    respond=ask,
    example_request=lambda images: AskRequest(images[:2], ["what color?", "how many?"]),
    request_options=request_options,
    evaluation=Evaluation("vqa", "visual question answering: VQA accuracy", VqaEvalConfig, evaluate_vqa,
                          lambda cfg: cfg.predictor_options()),
    commands=(Command("ask", "answer a question or follow an instruction about an image", AskOptions, _ask_command),),
    training=VQA_ANSWERS,
)
