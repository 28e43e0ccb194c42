"""Building an index of a collection, adding to it and removing from it (`vlp index build | add | remove`).

A collection is a folder of images (searched recursively), a CSV (`filepath`, `title` and any other
columns, which become metadata), a COCO captions JSON, or WebDataset shards ("a-{000..009}.tar"; an item
is a sample's image, its `txt` the caption and its `json`'s plain fields the metadata; its path is
`shard.tar#member`). Images are embedded in parts of `part_size`;
each finished part is kept in `parts/`, so a killed build, run again, embeds only what is missing and ends
with the same index. Under `torchrun` each process embeds every world-size-th part and process 0 merges
them: the same parts, so the same index as one process builds. Images that cannot be read are skipped,
counted and named in the manifest.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlp.data.pipeline import expand_shards
from vlp.data.sources import (
    IMAGE_EXTENSIONS,
    DataError,
    as_rgb,
    csv_reader,
    detect_format,
    load_image,
    read_coco_captions,
    resolve_image,
)
from vlp.distributed import barrier, rank, world_size
from vlp.errors import BadQuery
from vlp.evals import one_vector_each
from vlp.index import MANIFEST, CollectionIndex, save_vectors
from vlp.index.store import Item, Metadata
from vlp.index.vectors import build_faiss
from vlp.outputs import replacing, write_text

log = logging.getLogger("vlp.index")


def read_collection(spec: str | Path, images_dir: str | Path | None = None) -> list[Item]:
    """The items of a folder of images, a CSV, a COCO captions JSON or WebDataset shards, in a fixed order."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        return [Item(str(p.resolve()), key=str(p.relative_to(path))) for p in files]
    if detect_format(str(spec)) == "webdataset":
        return [item for shard in expand_shards(str(spec)) for item in _shard_items(Path(shard))]
    if not path.is_file():
        raise DataError(f"collection not found: {path} (a folder of images, a CSV, a COCO captions JSON or shards)")
    if detect_format(str(path)) == "coco":
        return [Item(str(entry.path.resolve()), entry.captions[0] if entry.captions else "", str(entry.path.name))
                for entry in read_coco_captions(path, images_dir=images_dir)]
    reader = csv_reader(path)
    if "filepath" not in (reader.fieldnames or []):
        raise DataError(f"{path}: no column 'filepath' (columns: {', '.join(reader.fieldnames or []) or 'none'})")
    roots = [Path(images_dir)] if images_dir else [path.parent, Path.cwd()]
    items, seen = [], set()
    for raw in reader:
        # Bytes that are not UTF-8 become replacement characters: SQLite takes no surrogates.
        row = {k: (v or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in raw.items() if k}
        name = row.pop("filepath")
        if name in seen:  # a collection item is an image: its first row holds its metadata
            continue
        seen.add(name)
        caption = row.pop("title", "")
        items.append(Item(str(resolve_image(name, roots).resolve()), caption, name, row))
    return items


def _shard_items(shard: Path) -> list[Item]:
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.isfile() and "." in Path(member.name).name:
                    key, extension = member.name.split(".", 1)
                    members.setdefault(key, {})[extension.lower()] = member
            items = []
            for key, files in members.items():
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                if image is None:
                    continue
                caption = tar.extractfile(files["txt"]).read().decode("utf-8", "replace").strip() if "txt" in files else ""
                extra: dict[str, str] = {}
                if "json" in files:
                    try:
                        data = json.loads(tar.extractfile(files["json"]).read())
                        extra = {k: str(v) for k, v in data.items() if isinstance(v, str | int | float) and k.isidentifier()}
                    except (json.JSONDecodeError, AttributeError):
                        pass
                items.append(Item(f"{shard.resolve()}#{image.name}", caption, f"{shard.name}/{key}", extra))
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{shard} is not a readable WebDataset shard: {err}") from err
    return items


def load_item_image(path: str) -> Image.Image:
    """An item's image: a file, or a member of a WebDataset shard (`shard.tar#member`)."""
    shard, _, member = path.partition("#")
    if not member or not shard.endswith(".tar"):
        return load_image(Path(path))
    try:
        with tarfile.open(shard) as tar:
            data = tar.extractfile(member).read()
        with Image.open(io.BytesIO(data)) as image:
            return as_rgb(image)
    except (tarfile.TarError, OSError, KeyError, AttributeError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}", cause="unreadable_image") from err


def _embed_part(embed_images: Callable[[list[Any]], torch.Tensor], items: Sequence[Item]
                ) -> tuple[np.ndarray, list[int], list[str]]:
    """The embeddings of a part's readable images, their positions in the part, and the unreadable ones."""
    images, kept, bad = [], [], []
    for position, item in enumerate(items):
        try:
            images.append(load_item_image(item.path))
            kept.append(position)
        except DataError as err:
            bad.append(str(err))
    if not images:
        return np.zeros((0, 0), np.float32), [], bad
    return one_vector_each(embed_images(images)).numpy(), kept, bad


def embed_collection(embed_images: Callable[[list[Any]], torch.Tensor], items: Sequence[Item], parts: Path,
                     *, first_id: int = 0, part_size: int = 256, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Vectors and ids of the readable items, embedded part by part; finished parts in `parts` are reused.
    Each process of a distributed run embeds its share of the parts; all return the whole (after a barrier)."""
    parts.mkdir(parents=True, exist_ok=True)
    count = (len(items) + part_size - 1) // part_size
    mine = {number for number in range(count) if number % world_size() == rank()}
    start_time, done = time.perf_counter(), 0
    share = sum(len(items[n * part_size : (n + 1) * part_size]) for n in mine)
    with tqdm(total=share, unit="image", disable=not progress or rank() != 0, desc="embedding") as bar:
        for number in sorted(mine):
            chunk = items[number * part_size : (number + 1) * part_size]
            path = parts / f"part-{number:05d}.npz"
            if not path.is_file():
                part_vectors, kept, part_bad = _embed_part(embed_images, chunk)
                with replacing(path, "wb") as handle:  # a part is kept only when whole
                    np.savez(handle, vectors=part_vectors, kept=np.array(kept, dtype=np.int64),
                             bad=np.array(json.dumps(part_bad)))
                done += len(chunk)
            bar.update(len(chunk))
            elapsed = time.perf_counter() - start_time
            bar.set_postfix(images_s=f"{done / elapsed:.1f}" if elapsed > 0 else "-")
    barrier()
    vectors, ids, bad = [], [], []
    for number in range(count):
        stored = np.load(parts / f"part-{number:05d}.npz")
        if len(stored["kept"]):
            vectors.append(stored["vectors"])
            ids.append(first_id + number * part_size + stored["kept"])
        bad += json.loads(str(stored["bad"]))
    if not vectors:
        raise DataError(f"none of the {len(items)} images could be read (first: {bad[0] if bad else 'none'})")
    return np.concatenate(vectors).astype(np.float32), np.concatenate(ids).astype(np.int64), bad


def build_index(functions: Any, collection: str | Path, out: str | Path, *, checkpoint: str, images_dir: str | None = None,
                part_size: int = 256, index_type: str | None = None, progress: bool = True) -> Path:
    """Embed a collection with `functions.embed_images` and write the index folder `out` (resumable)."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        raise BadQuery(f"{out} holds a built index already: search it, add to it, or give another --out")
    items = read_collection(collection, images_dir)
    if not items:
        raise DataError(f"{collection}: no images")
    embed_images = functions.require("embed_images")
    vectors, ids, bad = embed_collection(embed_images, items, out / "parts", part_size=part_size, progress=progress)
    if rank() != 0:  # process 0 writes the index
        barrier()
        return out
    index, settings = build_faiss(vectors, ids, index_type)
    store_path = out / "metadata.sqlite"
    store_path.unlink(missing_ok=True)  # a build killed while writing it: it is made again from the items
    Metadata.create(store_path, [items[i] for i in ids], ids.tolist()).close()
    # Absolute: the index is searched (and served) from anywhere.
    where = Path(checkpoint)
    manifest = {"checkpoint": str(where.resolve()) if where.exists() else checkpoint, "collection": str(collection), "count": len(ids), "dim": int(vectors.shape[1]),
                "index": settings, "bad_images": len(bad), "bad_examples": bad[:20]}
    save_vectors(out, vectors, ids, index, manifest)
    shutil.rmtree(out / "parts")
    if bad:
        log.warning("%d of %d images could not be read and were skipped (first: %s)", len(bad), len(items), bad[0])
    barrier()
    return out


def add_to_index(functions: Any, folder: str | Path, collection: str | Path, *, images_dir: str | None = None,
                 progress: bool = True) -> int:
    """Embed the collection's items whose keys the index lacks and add them; returns how many were added."""
    index = CollectionIndex(folder)
    known = index.metadata.keys()
    items = [item for item in read_collection(collection, images_dir) if item.key not in known]
    if not items:
        return 0
    first = index.metadata.next_id()
    vectors, ids, bad = embed_collection(functions.require("embed_images"), items, index.folder / "parts-add",
                                         first_id=first, progress=progress)
    if vectors.shape[1] != index.dim:
        raise BadQuery(f"the checkpoint gives {vectors.shape[1]}-dimensional embeddings; the index holds {index.dim}")
    index.metadata.insert([items[i - first] for i in ids], ids.tolist())
    index.faiss.add_with_ids(vectors, ids)
    all_vectors = np.concatenate([np.asarray(index.vectors), vectors])
    manifest = {**index.manifest, "count": int(index.metadata.count()),
                "bad_images": index.manifest["bad_images"] + len(bad)}
    save_vectors(index.folder, all_vectors, np.concatenate([index.ids, ids]), index.faiss, manifest)
    shutil.rmtree(index.folder / "parts-add")
    index.close()
    return len(ids)


def remove_from_index(folder: str | Path, *, keys: Sequence[str] = (), filters: Sequence[str] = ()) -> int:
    """Mark the items with these keys, or passing these filters, removed; returns how many."""
    if not keys and not filters:
        raise BadQuery("say what to remove: --key KEY or --filter COLUMN=VALUE")
    index = CollectionIndex(folder)
    ids = set(index.metadata.matching(filters)) if filters else set()
    if keys:
        found = index.metadata.with_keys(keys)
        ids = ids & found if filters else found
    index.metadata.remove(sorted(ids))
    manifest = {**index.manifest, "count": int(index.metadata.count())}
    write_text(index.folder / MANIFEST, json.dumps(manifest, indent=1))
    index.close()
    return len(ids)
