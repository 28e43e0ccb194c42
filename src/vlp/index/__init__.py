"""A searchable index of a user's collection (`vlp index`): a folder of

    manifest.json      the checkpoint that embedded it, the vector index's kind, settings and measured recall,
                       the counts and the images that could not be read
    vectors.npy        normalised embeddings [N, E] (memory-mapped at load)
    ids.npy            the item id of each row of vectors.npy
    index.faiss        the faiss index over them (`vlp.index.vectors`)
    metadata.sqlite    one row per item: id, path, caption, key and the collection's other columns
    parts/             a build's finished parts, which a resumed build keeps

Search by text, image, both (weighted) or a given embedding; with metadata filters the result is exact
(the top k of the items that pass), without them it is the vector index's; results can be de-duplicated at
a cosine threshold and paged. Items are added and removed without a rebuild (a removed item is marked in
the metadata and never returned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlp.errors import BadQuery, DataError
from vlp.index.store import Metadata
from vlp.index.vectors import apply_settings, read_faiss, save_faiss
from vlp.outputs import replacing, write_text

MANIFEST = "manifest.json"


@dataclass
class Hit:
    id: int
    score: float
    item: dict[str, Any]


class CollectionIndex:
    """A built index folder, opened for search, additions and removals."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.folder} is not a vlp index (no {MANIFEST}; `vlp index build` makes one)")
        self.manifest = json.loads(path.read_text())
        self.vectors = np.load(self.folder / "vectors.npy", mmap_mode="r")
        self.ids = np.load(self.folder / "ids.npy")
        self.faiss = read_faiss(self.folder / "index.faiss")
        apply_settings(self.faiss, self.manifest["index"])
        self.metadata = Metadata(self.folder / "metadata.sqlite")
        self._row_of = {int(i): row for row, i in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, query: np.ndarray, *, k: int = 10, filters: tuple[str, ...] = (), offset: int = 0,
               dedup: float | None = None) -> list[Hit]:
        """The items most similar to `query` [E] (cosine), best first: `offset` skips the first results (paging),
        `dedup` drops an item whose cosine with a better one is at least that."""
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise BadQuery(f"a query of {query.shape[0]} dimensions for an index of {self.dim}")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        wanted = k + offset
        if filters:
            ranked = self._exact(query, self.metadata.matching(filters), wanted, dedup)
        else:
            ranked = self._approximate(query, wanted, dedup)
        page = ranked[offset : offset + k]
        rows = self.metadata.rows([i for i, _ in page])
        return [Hit(i, score, rows[i]) for i, score in page]

    def _exact(self, query: np.ndarray, allowed: list[int], wanted: int, dedup: float | None) -> list[tuple[int, float]]:
        if not allowed:
            return []
        positions = np.array([self._row_of[i] for i in allowed])
        scores = np.asarray(self.vectors[positions]) @ query
        order = np.argsort(-scores, kind="stable")
        return self._dedup([(allowed[p], float(scores[p])) for p in order], wanted, dedup)

    def _approximate(self, query: np.ndarray, wanted: int, dedup: float | None) -> list[tuple[int, float]]:
        removed = self.metadata.removed()
        fetch = min(len(self.ids), (wanted + len(removed)) * (4 if dedup else 1))
        if fetch == 0:
            return []
        scores, ids = self.faiss.search(query[None], fetch)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and int(i) not in removed]
        return self._dedup(found, wanted, dedup)

    def _dedup(self, ranked: list[tuple[int, float]], wanted: int, threshold: float | None) -> list[tuple[int, float]]:
        if threshold is None:
            return ranked[:wanted]
        kept: list[tuple[int, float]] = []
        kept_vectors: list[np.ndarray] = []
        for item, score in ranked:
            vector = np.asarray(self.vectors[self._row_of[item]])
            if all(float(vector @ other) < threshold for other in kept_vectors):
                kept.append((item, score))
                kept_vectors.append(vector)
                if len(kept) == wanted:
                    break
        return kept

    def close(self) -> None:
        self.metadata.close()


def save_vectors(folder: Path, vectors: np.ndarray, ids: np.ndarray, settings_index: Any, manifest: dict[str, Any]
                 ) -> None:
    """vectors.npy, ids.npy, index.faiss and manifest.json, each written whole or not at all."""
    with replacing(folder / "vectors.npy", "wb") as handle:
        np.save(handle, vectors)
    with replacing(folder / "ids.npy", "wb") as handle:
        np.save(handle, ids)
    save_faiss(settings_index, folder / "index.faiss")
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


__all__ = ["CollectionIndex", "Hit", "save_vectors"]
