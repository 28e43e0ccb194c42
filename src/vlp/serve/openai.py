"""OpenAI-compatible routes, for the unmodified `openai` client:

- `GET /v1/models`: the loaded models;
- `POST /v1/embeddings`: `input` a text or a list of them; images follow infinity's convention, a
  `modality: "image"` field (through the client's `extra_body`) with each input a data URI or base64;
  `encoding_format` float or base64 (little-endian float32, as OpenAI's); `dimensions` keeps the first
  that many and normalises them again;
- `POST /v1/chat/completions`, for models that answer questions: the last user message's text is the
  question and its `image_url` parts (data URIs) the images (else the latest images of the conversation);
  `max_tokens`; `temperature` 0 or absent decodes greedily, above 0 samples (nucleus, `top_p`);
  `stream: true` answers in server-sent events of `chat.completion.chunk`s. The answer is generated whole
  and then sent in word chunks.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from vlp.abilities import AnswersQuestions, EmbedsImages, EmbedsTexts
from vlp.errors import BadQuery
from vlp.evals import one_vector_each
from vlp.generation import GenerationConfig
from vlp.serve.images import decode_image
from vlp.serve.service import ServedModel, Service, UnknownModel, limit_values, read_body, validated
from vlp.tasks.vqa import VqaPredictor


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str]
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)
    modality: str = "text"
    user: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    seed: int | None = None


def _model(service: Service, name: str, ability: type, what: str) -> ServedModel:
    if name not in service.models:
        raise UnknownModel(f"no model {name!r} (models: {', '.join(service.models)})")
    model = service.models[name]
    if not model.pretrained.family.can(ability):
        raise BadQuery(f"model {name!r} ({model.pretrained.family.name}) cannot {what}")
    return model


def _embeddings(service: Service, body: dict[str, Any]) -> tuple[ServedModel, EmbeddingsRequest, list[Any]]:
    request = validated(EmbeddingsRequest, body)
    inputs = [request.input] if isinstance(request.input, str) else list(request.input)
    if not inputs or any(not isinstance(i, str) or not i for i in inputs):
        raise BadQuery("input: give a non-empty text (or list of them)")
    if request.encoding_format not in ("float", "base64"):
        raise BadQuery(f"encoding_format: {request.encoding_format!r} is not float or base64")
    if request.modality not in ("text", "image"):
        raise BadQuery(f"modality: {request.modality!r} is not text or image")
    ability = EmbedsImages if request.modality == "image" else EmbedsTexts
    model = _model(service, request.model, ability, f"embed {request.modality}s")
    if request.modality == "image":
        if len(inputs) > service.settings.max_items:
            raise BadQuery(f"input: {len(inputs)} images, over the limit of {service.settings.max_items}")
        inputs = [decode_image(v, f"input[{i}]", service.settings.images) for i, v in enumerate(inputs)]
    else:
        limit_values(inputs, "input", service.settings)
    return model, request, inputs


def _encode(vector: torch.Tensor, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def _messages(request: ChatRequest) -> tuple[list[Any], str]:
    """The images and the question of a conversation: the last user message's text, and its images (or
    the latest images given before it)."""
    images: list[Any] = []
    question = ""
    for number, message in enumerate(request.messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadQuery(f"messages[{number}]: expected an object with role system, user or assistant")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadQuery(f"messages[{number}].content: expected text or a list of content parts")
        texts, found = [], []
        for index, part in enumerate(parts):
            where = f"messages[{number}].content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                found.append(part["image_url"].get("url"))
            else:
                raise BadQuery(f"{where}: expected a text or image_url part")
        if message["role"] == "user":
            images, question = found or images, " ".join(texts).strip()
    if not question:
        raise BadQuery("messages: no user message with text to answer")
    if not images:
        raise BadQuery("messages: no image to answer about (an image_url part with a data URI)")
    return images, question


def _chunks(answer: str, completion: str, created: int, model: str) -> Iterator[str]:
    def event(delta: dict[str, str], finish: str | None = None) -> str:
        chunk = {"id": completion, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    words = answer.split(" ")
    for index, word in enumerate(words):
        yield event({"content": word if index == 0 else f" {word}"})
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


def add_openai_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vlp"}
                                           for name in service.models]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        deadline = time.monotonic() + service.settings.timeout_s
        body = await read_body(request, service.settings)
        model, parsed, inputs = await run_in_threadpool(_embeddings, service, body)  # decodes images
        request.state.model = model.name
        functions = model.functions({}, deadline)
        embed = functions.require("embed_images" if parsed.modality == "image" else "embed_texts")
        with model.queue.request():
            vectors = one_vector_each(await run_in_threadpool(embed, inputs))
        if parsed.dimensions is not None:
            if parsed.dimensions > vectors.shape[1]:
                raise BadQuery(f"dimensions: {parsed.dimensions} is more than the model's {vectors.shape[1]}")
            vectors = vectors[:, : parsed.dimensions]
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        tokens = sum(len(i.split()) for i in inputs) if parsed.modality == "text" else 0
        return JSONResponse({"object": "list", "model": parsed.model, "usage": {"prompt_tokens": tokens,
                                                                                "total_tokens": tokens},
                             "data": [{"object": "embedding", "index": i, "embedding": _encode(v, parsed.encoding_format)}
                                      for i, v in enumerate(vectors)]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        deadline = time.monotonic() + service.settings.timeout_s
        parsed = validated(ChatRequest, await read_body(request, service.settings))
        model = _model(service, parsed.model, AnswersQuestions, "answer questions")
        request.state.model = model.name
        urls, question = _messages(parsed)
        limit_values(question, "messages", service.settings)
        images = await run_in_threadpool(lambda: [decode_image(url, "image_url", service.settings.images)
                                                  for url in urls])
        tokens = parsed.max_completion_tokens or parsed.max_tokens or 64
        sampled = bool(parsed.temperature)
        generation = GenerationConfig(method="nucleus" if sampled else "greedy", max_new_tokens=tokens,
                                      min_new_tokens=1, temperature=parsed.temperature or 1.0,
                                      top_p=parsed.top_p or 1.0, seed=parsed.seed)
        functions = model.functions({VqaPredictor: {"generation": generation}}, deadline)
        ask = functions.follow_instructions or functions.require("answer")
        image: Any = images[0] if len(images) == 1 else images
        with model.queue.request():
            (answer,) = await run_in_threadpool(ask, [image], [question])
        completion, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return StreamingResponse(_chunks(answer, completion, created, parsed.model),
                                     media_type="text/event-stream")
        words = len(answer.split())
        return JSONResponse({"id": completion, "object": "chat.completion", "created": created, "model": parsed.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": len(question.split()), "completion_tokens": words,
                                       "total_tokens": len(question.split()) + words}})

