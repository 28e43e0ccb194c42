"""Search routes over the indices `vlp serve --index NAME=DIR` opens (`vlp.index`):

- `POST /v1/search`: {"index" (when several), "text", "image" (base64 or a data URI), "weights" (with both),
  "embedding", "filter": ["shape=circle", ...], "k", "offset", "dedup"} -> {"results": [{"id", "score",
  "path", "caption", "key", and the item's other columns}]};
- `GET /v1/indices`: each index's manifest;
- `GET /v1/indices/{name}/items/{id}/image`: an item's image (only the index's own files are served).
"""

from __future__ import annotations

import io
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from vlp.errors import BadQuery
from vlp.serve.images import decode_image
from vlp.serve.service import Service, UnknownModel, limit_values, read_body, validated


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = None
    text: str | None = None
    image: str | None = None
    weights: list[float] = Field(default_factory=list)
    embedding: list[float] | None = None
    filter: list[str] = Field(default_factory=list)
    k: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=100_000)
    dedup: float | None = Field(None, ge=-1, le=1)


def add_search_routes(app: FastAPI, service: Service) -> None:
    def index_named(name: str | None) -> tuple[str, Any, Any]:
        if name is None:
            if len(service.indices) != 1:
                raise BadQuery(f"name the index to search: 'index' is one of {', '.join(service.indices) or 'none'}")
            name = next(iter(service.indices))
        if name not in service.indices:
            raise UnknownModel(f"no index {name!r} (indices: {', '.join(service.indices) or 'none'})")
        return (name, *service.indices[name])

    def search(request: SearchRequest, deadline: float) -> dict[str, Any]:
        from vlp.index.command import query_vector

        name, index, model = index_named(request.index)
        limit_values([t for t in (request.text,) if t is not None], "text", service.settings)
        limit_values(request.filter, "filter", service.settings)
        image = decode_image(request.image, "image", service.settings.images) if request.image is not None else None
        with model.queue.request():
            query = query_vector(model.functions({}, deadline), text=request.text, image=image,
                                 weights=request.weights, embedding=None) if request.embedding is None else \
                request.embedding
            if request.embedding is not None and (request.text is not None or image is not None):
                raise BadQuery("an embedding is a whole query: give it alone")
            hits = index.search(query, k=request.k, filters=tuple(request.filter), offset=request.offset,
                                dedup=request.dedup)
        return {"index": name, "results": [{"id": h.id, "score": h.score, **{k: v for k, v in h.item.items()
                                                                             if k != "removed"}} for h in hits]}

    @app.post("/v1/search")
    async def search_route(request: Request) -> JSONResponse:
        deadline = time.monotonic() + service.settings.timeout_s
        parsed = validated(SearchRequest, await read_body(request, service.settings))
        return JSONResponse(await run_in_threadpool(search, parsed, deadline))

    @app.get("/v1/indices")
    def indices() -> dict[str, Any]:
        return {name: {**index.manifest, "model": model.name} for name, (index, model) in service.indices.items()}

    @app.get("/v1/indices/{name}/items/{item}/image")
    def item_image(name: str, item: int) -> Response:
        _, index, _ = index_named(name)
        rows = index.metadata.rows([item])
        if item not in rows or rows[item]["removed"]:
            raise UnknownModel(f"index {name!r} has no item {item}")
        path = rows[item]["path"]
        if "#" not in path:
            return FileResponse(path)
        from vlp.index.build import load_item_image  # a shard's member, sent as PNG

        out = io.BytesIO()
        load_item_image(path).save(out, "PNG")
        return Response(out.getvalue(), media_type="image/png")
