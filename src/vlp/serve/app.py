"""The HTTP service: every task a loaded model can do, as a route of the task table, with dynamic batching,
limits, health and metrics (`create_app`; `vlp serve` runs it under uvicorn).

Routes: `POST /v1/<route>` for each task (the body is the task's request, with `model` naming the model
when several are loaded), the OpenAI-compatible `/v1/models`, `/v1/embeddings` and `/v1/chat/completions`
(`vlp.serve.openai`), `/livez`, `/readyz`, `/metrics` and the OpenAPI docs at `/docs`. Every error is a
JSON body in OpenAI's shape, {"error": {"message", "type", "code"}}, with a 4xx status for a request's
problem, which the message names (a 5xx only for the service's own faults).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlp.checkpoint import Pretrained
from vlp.config import ConfigError, from_dict
from vlp.errors import USER_ERRORS, BadQuery
from vlp.serve.batching import DeadlineExceeded, QueueFull
from vlp.serve.images import ImageLimits, PayloadTooLarge, decode_image
from vlp.serve.openai import add_openai_routes
from vlp.serve.search import add_search_routes
from vlp.serve.service import (
    ServedModel,
    ServeSettings,
    Service,
    UnknownModel,
    error_response,
    limit_values,
    read_body,
)
from vlp.tasks import TASKS
from vlp.tasks.base import Task

log = logging.getLogger("vlp.serve")
access_log = logging.getLogger("vlp.serve.access")

OPEN_PATHS = ("/", "/livez", "/readyz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect")
PAGE = Path(__file__).parent / "static" / "index.html"


def _status(err: BaseException) -> int:
    if isinstance(err, PayloadTooLarge):
        return 413
    if isinstance(err, QueueFull):
        return 429
    if isinstance(err, UnknownModel):
        return 404
    if isinstance(err, ConfigError):
        return 422
    return 400


def _decode_images(value: Any, where: str, limits: ImageLimits) -> Any:
    if isinstance(value, list):
        return [_decode_images(item, f"{where}[{index}]", limits) for index, item in enumerate(value)]
    return decode_image(value, where, limits)


def parse_request(task: Task, body: dict[str, Any], settings: ServeSettings) -> Any:
    """The task's typed request from a JSON body: fields checked by type and range, limits applied, images
    decoded."""
    image_fields = [f.name for f in dataclasses.fields(task.request) if f.metadata.get("image")]
    for name, value in body.items():
        if name not in image_fields:
            limit_values(value, name, settings)
        elif isinstance(value, list) and len(value) > settings.max_items:
            raise PayloadTooLarge(f"{name}: {len(value)} images, over the limit of {settings.max_items}")
    images = {name: body.pop(name) for name in image_fields if name in body}
    # The fields' own types say file names; the images are checked and decoded apart, below.
    request = from_dict(task.request, {**body, **{name: [] if isinstance(v, list) else "" for name, v in images.items()}})
    for name, value in images.items():
        setattr(request, name, _decode_images(value, name, settings.images))
    return request


def _to_json(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _task_route(app: FastAPI, service: Service, task: Task) -> None:
    schema = TypeAdapter(task.request).json_schema()
    schema.setdefault("properties", {})["model"] = {"type": "string", "description": "the model to use"}

    def respond(body: dict[str, Any], model: ServedModel, deadline: float) -> Any:
        # In a worker thread: decoding images and computing must not hold up the event loop.
        typed = parse_request(task, body, service.settings)
        with model.queue.request():
            return task.respond(model.functions(task.request_options(typed), deadline), typed)

    async def answer(request: Request) -> JSONResponse:
        deadline = time.monotonic() + service.settings.timeout_s
        body = await read_body(request, service.settings)
        name = body.pop("model", None)
        if name is not None and not isinstance(name, str):
            raise BadQuery(f"model: expected a model's name, got {name!r}")
        model = service.model_for(task, name)
        request.state.model = model.name
        return JSONResponse(_to_json(await run_in_threadpool(respond, body, model, deadline)))

    app.add_api_route(f"/v1/{task.route}", answer, methods=["POST"], name=task.name, summary=task.route,
                      openapi_extra={"requestBody": {"required": True,
                                                     "content": {"application/json": {"schema": schema}}}})


def create_app(models: Mapping[str, str | Path | Pretrained], settings: ServeSettings | None = None, *,
               indices: Mapping[str, str | Path] | None = None, load: bool = True) -> FastAPI:
    """The service for `models` (name -> checkpoint folder or a loaded `Pretrained`) and `indices` (name ->
    `vlp index` folder). They load in a background thread when the app starts (`/readyz` answers 503 until
    then); `load=False` leaves loading to the caller (`app.state.service.load()`)."""
    from contextlib import asynccontextmanager

    service = Service(models, settings or ServeSettings(), indices)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            threading.Thread(target=service.load, name="vlp-load", daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="vlp", summary="vision-language models over HTTP", lifespan=lifespan)
    app.state.service = service

    def add_task_routes() -> None:
        """A route for each task a loaded model can do; the docs are made again to show them."""
        for task in TASKS:
            if task.route and task.respond is not None and any(task in m.tasks() for m in service.models.values()):
                _task_route(app, service, task)
        app.openapi_schema = None

    service.on_ready.append(add_task_routes)
    add_openai_routes(app, service)
    add_search_routes(app, service)
    _add_operations(app, service)
    return app


def _add_operations(app: FastAPI, service: Service) -> None:
    metrics = service.metrics
    known = {f"/v1/{task.route}" for task in TASKS if task.route} | {getattr(r, "path", "") for r in app.routes}

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        """The page to try the loaded models and search the indices (plain HTML and JavaScript)."""
        return HTMLResponse(PAGE.read_text())

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if service.load_error:
            return error_response(503, f"the models could not be loaded: {service.load_error}")
        if not service.ready.is_set():
            return error_response(503, "loading the models")
        return JSONResponse({"status": "ready", "models": {n: m.pretrained.family.name for n, m in service.models.items()}})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def gate_and_log(request: Request, call_next: Any) -> Response:
        start = time.monotonic()
        path = request.url.path
        length = request.headers.get("content-length")
        if service.draining and path not in OPEN_PATHS:
            response: Response = error_response(503, "the service is shutting down", {"Connection": "close"})
        elif not service.ready.is_set() and path not in OPEN_PATHS:
            response = error_response(503, "the models are still loading; see /readyz", {"Retry-After": "5"})
        elif length is not None and (not length.isdigit() or int(length) > service.settings.max_body_bytes):
            response = error_response(413, f"the request body is over the limit of {service.settings.max_body_bytes:,} bytes")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a fault of the service itself: logged with its traceback, answered 500
                log.exception("request to %s failed", path)
                response = error_response(500, "internal error (logged by the service)")
        route = request.scope.get("route")
        # A request refused before routing (while loading) counts by its path when it is a route's.
        label = getattr(route, "path", None) or (path if path in known else "unmatched")
        elapsed = time.monotonic() - start
        metrics.request(label, response.status_code, elapsed)
        access_log.info(json.dumps({"method": request.method, "path": path, "status": response.status_code,
                                    "ms": round(elapsed * 1000, 1), "model": getattr(request.state, "model", None)}))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(err.status_code, str(err.detail))
        return error_response(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(DeadlineExceeded)
    async def late(request: Request, err: DeadlineExceeded) -> JSONResponse:
        return error_response(503, str(err))

    for kind in USER_ERRORS:
        @app.exception_handler(kind)
        async def user_error(request: Request, err: Exception) -> JSONResponse:
            headers = {"Retry-After": "1"} if isinstance(err, QueueFull) else None
            # A request's fields are no config keys: the field's name says where.
            return error_response(_status(err), str(err).replace("config key ", "field "), headers)
