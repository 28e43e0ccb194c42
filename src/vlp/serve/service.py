"""The service's state: its settings, its loaded models with their queues and predict functions, and what
every route shares (reading a body, the limits on texts and lists)."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from vlp.checkpoint import Pretrained
from vlp.errors import USER_ERRORS, BadQuery, CheckpointError, UnsupportedTask
from vlp.serve.batching import BatchSettings, ModelQueue, QueuedFunctions
from vlp.serve.images import ImageLimits, PayloadTooLarge
from vlp.serve.metrics import ServiceMetrics
from vlp.tasks import TASKS, PredictFunctions
from vlp.tasks.base import Task

log = logging.getLogger("vlp.serve")
MAX_OPTION_SETS = 64  # predict functions kept per model, one per distinct set of predictor options


@dataclass(frozen=True)
class ServeSettings:
    batch: BatchSettings = field(default_factory=BatchSettings)
    images: ImageLimits = field(default_factory=ImageLimits)
    max_body_bytes: int = 64 * 2**20
    max_items: int = 256  # images, texts, labels or queries in one request
    max_text_chars: int = 4096  # one text
    timeout_s: float = 120.0  # a request not computed by then is dropped
    device: str | None = None
    precision: str = "fp32"


class ServedModel:
    """A loaded model, its queue, and its predict functions per set of predictor options (made once each)."""

    def __init__(self, name: str, pretrained: Pretrained, settings: ServeSettings, metrics: ServiceMetrics):
        self.name, self.pretrained, self.settings = name, pretrained, settings
        self.queue = ModelQueue(name, settings.batch, observe=metrics.batch_observer(name),
                                depth=metrics.depth_setter(name))
        self._functions: OrderedDict[str, PredictFunctions] = OrderedDict()
        self._lock = threading.Lock()

    def tasks(self) -> list[Task]:
        return [task for task in TASKS if task.route and task.can(self.pretrained.family)]

    def functions(self, options: dict[type, dict[str, Any]], deadline: float) -> QueuedFunctions:
        key = repr(sorted((cls.__name__, sorted(o.items())) for cls, o in options.items()))
        with self._lock:
            if key not in self._functions:
                self._functions[key] = PredictFunctions(self.pretrained, options, device=self.settings.device,
                                                        precision=self.settings.precision)
                # Requests choose their options (generation settings...): the sets kept are bounded.
                while len(self._functions) > MAX_OPTION_SETS:
                    self._functions.popitem(last=False)
            self._functions.move_to_end(key)
            functions = self._functions[key]
        return QueuedFunctions(functions, self.queue, deadline)


class Service:
    """The models of an app and its state: loading, ready, draining (after SIGTERM: new requests get 503)."""

    def __init__(self, sources: Mapping[str, str | Path | Pretrained], settings: ServeSettings,
                 indices: Mapping[str, str | Path] | None = None):
        self.sources, self.settings = dict(sources), settings
        self.index_folders = dict(indices or {})
        self.metrics = ServiceMetrics()
        self.models: dict[str, ServedModel] = {}
        self.indices: dict[str, tuple[Any, ServedModel]] = {}  # name -> (CollectionIndex, the model embedding queries)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.draining = False
        self.on_ready: list[Any] = []  # called once the models are loaded (the app adds their routes)

    def load(self) -> None:
        from vlp.convert import load_pretrained

        try:
            for name, source in self.sources.items():
                pretrained = source if isinstance(source, Pretrained) else load_pretrained(source)
                self.models[name] = ServedModel(name, pretrained, self.settings, self.metrics)
                log.info("model %s loaded (%s) from %s", name, pretrained.family.name, pretrained.path)
            for name, folder in self.index_folders.items():
                self._open_index(name, folder)
            for callback in self.on_ready:
                callback()
            self.ready.set()
        except USER_ERRORS as err:
            self.load_error = str(err)
            log.error("cannot load the models: %s", err)

    def _open_index(self, name: str, folder: str | Path) -> None:
        """An index and the model that embeds its queries: the loaded model of its checkpoint, else that
        checkpoint loaded under the index's name."""
        from vlp.convert import load_pretrained
        from vlp.index import CollectionIndex

        index = CollectionIndex(folder)
        checkpoint = _weights_folder(index.manifest["checkpoint"])
        model = next((m for m in self.models.values() if _weights_folder(m.pretrained.path) == checkpoint), None)
        if model is None:
            if name in self.models:
                raise BadQuery(f"index {name}: its checkpoint {checkpoint} is not loaded, and a model is named {name!r}")
            model = self.models[name] = ServedModel(name, load_pretrained(checkpoint), self.settings, self.metrics)
        self.indices[name] = (index, model)
        log.info("index %s opened: %d items, embedded by model %s", name, index.manifest["count"], model.name)

    def model_for(self, task: Task, name: str | None) -> ServedModel:
        """The model a request names, or the only one that can do `task`."""
        if name is not None:
            if name not in self.models:
                raise UnknownModel(f"no model {name!r} (models: {', '.join(self.models)})")
            model = self.models[name]
            if not task.can(model.pretrained.family):
                raise UnsupportedTask(f"model {name!r} ({model.pretrained.family.name}) cannot {task.route}")
            return model
        able = [m for m in self.models.values() if task.can(m.pretrained.family)]
        if len(able) != 1:
            which = f"name one with 'model' ({', '.join(m.name for m in able)})" if able else "none can"
            raise BadQuery(f"{len(able)} of the loaded models can {task.route}: {which}")
        return able[0]

    def close(self) -> None:
        for model in self.models.values():
            model.queue.close()


def _weights_folder(path: str | Path) -> Path:
    """Where a checkpoint's weights are: a run folder names its latest checkpoint (so that the two match)."""
    from vlp.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path).resolve()
    except CheckpointError:  # another library's folder
        return Path(path).resolve()


class UnknownModel(BadQuery):
    """A request names a model the service has not loaded (404)."""


def validated(cls: type[Any], body: dict[str, Any]) -> Any:
    """A pydantic model of a request body; the first problem, named by its field, as a 400."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadQuery(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def limit_values(value: Any, where: str, settings: ServeSettings) -> None:
    """Lists no longer than `max_items`, texts no longer than `max_text_chars` (images are checked apart)."""
    if isinstance(value, str) and len(value) > settings.max_text_chars:
        raise PayloadTooLarge(f"{where}: {len(value):,} characters, over the limit of {settings.max_text_chars:,}")
    if isinstance(value, list):
        if len(value) > settings.max_items:
            raise PayloadTooLarge(f"{where}: {len(value)} entries, over the limit of {settings.max_items}")
        for index, item in enumerate(value):
            if isinstance(item, str) and not item.strip():
                raise BadQuery(f"{where}[{index}]: empty text")
            limit_values(item, f"{where}[{index}]", settings)


async def read_body(request: Request, settings: ServeSettings) -> dict[str, Any]:
    """A request's JSON object, or a multipart form: its `request` part (JSON) with each file part added to
    the image field it is named after."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        raw = form.get("request")
        try:
            body = json.loads(raw) if isinstance(raw, str) else {}
        except json.JSONDecodeError as err:
            raise BadQuery(f"the form's 'request' part is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadQuery("the form's 'request' part must be a JSON object")
        for name, part in form.multi_items():
            if name != "request" and isinstance(part, UploadFile):
                body.setdefault(name, []).append(await part.read())
        return body
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > settings.max_body_bytes:
            raise PayloadTooLarge(f"the request body is over the limit of {settings.max_body_bytes:,} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadQuery(f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadQuery(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape, which its client and most others read: {"error": {"message", "type", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)
