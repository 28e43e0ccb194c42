"""`vlp index build | add | remove | search`: the flags (kept apart from faiss and torch, so that building
the command line stays quick) and what each command does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlp.config import Fraction, NonNegativeInt, PositiveInt
from vlp.errors import BadQuery, ConfigError
from vlp.flags import option

Precision = Literal["fp32", "bf16", "auto"]


@dataclass
class BuildCommand:
    checkpoint: str = option(help="the model that embeds the images (any that embeds images and texts)")
    images: str = option(help="the collection: a folder of images, a CSV (filepath, title, other columns) or a "
                         "COCO captions JSON")
    out: str = option(help="the index folder to write (a killed build, run again, goes on)")
    images_dir: str | None = option(None, help="folder the collection's image paths resolve against")
    precision: Precision = option("fp32", help="compute in fp32, bf16, or bf16 where the hardware has it")
    batch_size: PositiveInt = option(64, help="images embedded at once")
    part_size: PositiveInt = option(256, help="images per part kept for resuming")
    index_type: str | None = option(None, help="a faiss index factory string (default: chosen by size: Flat, "
                                    "HNSW32, IVF-PQ)")


@dataclass
class AddCommand:
    index: str = option(help="the index folder", positional=True)
    images: str = option(help="images to add (a folder, CSV or COCO JSON); items whose key is in the index are "
                         "skipped")
    images_dir: str | None = option(None, help="folder the image paths resolve against")
    precision: Precision = option("fp32", help="compute in fp32, bf16, or bf16 where the hardware has it")


@dataclass
class RemoveCommand:
    index: str = option(help="the index folder", positional=True)
    key: list[str] = option(default_factory=list, repeat=True, help="the key of an item to remove (repeatable)")
    filter: list[str] = option(default_factory=list, repeat=True, help="remove the items passing this filter, "
                               "e.g. shape=circle (repeatable: all must pass)")


@dataclass
class SearchCommand:
    index: str = option(help="the index folder", positional=True)
    text: str | None = option(None, help="search by this text")
    image: str | None = option(None, help="search by this image")
    weights: list[float] = option(default_factory=list, help="with --image and --text: their weights, e.g. 0.5 0.5")
    embedding: str | None = option(None, help="search by this embedding (.npy, [E])")
    filter: list[str] = option(default_factory=list, repeat=True, help="only items passing this filter: "
                               "column=value, column>=value ..., column in a,b (repeatable)")
    k: PositiveInt = option(10, help="results")
    offset: NonNegativeInt = option(0, help="skip this many results first (paging)")
    dedup: Fraction | None = option(None, help="drop a result whose cosine with a better one is at least this")
    checkpoint: str | None = option(None, help="the model that embeds the query (default: the index's)")
    precision: Precision = option("fp32", help="compute in fp32, bf16, or bf16 where the hardware has it")
    json: bool = option(False, help="print the results as JSON")


def _functions(checkpoint: str, precision: str, batch_size: int | None = None) -> Any:
    from vlp.convert import load_pretrained
    from vlp.tasks import predict_functions

    return predict_functions(load_pretrained(checkpoint), precision=precision, batch_size=batch_size, progress=False)


def run_build(command: BuildCommand) -> None:
    from vlp.distributed import process_group, rank
    from vlp.index.build import build_index

    with process_group():  # under torchrun, each process embeds its share
        functions = _functions(command.checkpoint, command.precision, command.batch_size)
        out = build_index(functions, command.images, command.out, checkpoint=command.checkpoint,
                          images_dir=command.images_dir, part_size=command.part_size, index_type=command.index_type)
        if rank() != 0:
            return
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"index of {manifest['count']} images written to {out} ({manifest['index']['type']}, recall@10 "
          f"{manifest['index']['recall_at_10']:.3f}; {manifest['bad_images']} unreadable images skipped)")


def run_add(command: AddCommand) -> None:
    from vlp.index import CollectionIndex
    from vlp.index.build import add_to_index

    checkpoint = CollectionIndex(command.index).manifest["checkpoint"]
    added = add_to_index(_functions(checkpoint, command.precision), command.index, command.images,
                         images_dir=command.images_dir)
    print(f"{added} images added to {command.index}")


def run_remove(command: RemoveCommand) -> None:
    from vlp.index.build import remove_from_index

    print(f"{remove_from_index(command.index, keys=command.key, filters=command.filter)} items removed from "
          f"{command.index}")


def query_vector(functions: Any, *, text: str | None = None, image: Any = None, weights: list[float] | None = None,
                 embedding: str | None = None) -> Any:
    """The query of a search: a text's or an image's embedding, both combined with weights, or a given one."""
    import numpy as np
    import torch

    from vlp.evals import one_vector_each
    from vlp.tasks.embedding import EmbedRequest, embed

    if embedding is not None:
        if text is not None or image is not None:
            raise ConfigError("--embedding is a whole query: give it alone")
        path = Path(embedding)
        if not path.is_file():
            raise ConfigError(f"--embedding {embedding}: file not found")
        return np.load(path).reshape(-1)
    if text is None and image is None:
        raise ConfigError("search by --text, --image, both (with --weights) or --embedding")
    if text is not None and image is not None:
        request = EmbedRequest(texts=[text], images=[image], weights=list(weights or []))
    elif weights:
        raise BadQuery("--weights combine an image with a text: give both")
    else:
        request = EmbedRequest(texts=[text] if text is not None else [], images=[image] if image is not None else [])
    return one_vector_each(torch.tensor(embed(functions, request).embeddings)).numpy()[0]


def run_search(command: SearchCommand) -> None:
    from vlp.index import CollectionIndex

    index = CollectionIndex(command.index)
    functions = None if command.embedding else _functions(command.checkpoint or index.manifest["checkpoint"],
                                                          command.precision)
    query = query_vector(functions, text=command.text, image=command.image, weights=command.weights,
                         embedding=command.embedding)
    hits = index.search(query, k=command.k, filters=tuple(command.filter), offset=command.offset, dedup=command.dedup)
    if command.json:
        print(json.dumps([{"id": h.id, "score": h.score, **h.item} for h in hits], indent=1))
        return
    for rank, hit in enumerate(hits, start=command.offset + 1):
        caption = f"  {hit.item['caption']}" if hit.item.get("caption") else ""
        print(f"{rank:>4}. {hit.score:.4f}  {hit.item['path']}{caption}")
    if not hits:
        print("no results" + (" pass the filters" if command.filter else ""))


COMMANDS = {"build": (BuildCommand, run_build, "embed a collection into a searchable index"),
            "add": (AddCommand, run_add, "add images to an index without rebuilding it"),
            "remove": (RemoveCommand, run_remove, "remove items from an index"),
            "search": (SearchCommand, run_search, "search an index by text, image, both or an embedding")}
