"""The vector side of an index: normalised float32 embeddings in `vectors.npy` (memory-mapped at load) and
a faiss index over them, of the kind autofaiss would choose for the collection's size.

- under 10,000 vectors: `Flat` (exact);
- while the vectors fit the memory budget: `HNSW32`, its `efSearch` raised until recall@10 against exact
  search on a sample reaches 0.95 or a query takes longer than the latency target;
- above: `IVF<n>,PQ<m>`, its `nprobe` tuned the same way.

Inner product on normalised vectors is cosine similarity. Every index is wrapped to carry the items' ids.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

# faiss announces at INFO which of its builds it loads; that is no news to a user.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

FLAT_BELOW = 10_000
RECALL_TARGET = 0.95
LATENCY_TARGET_S = 0.01


def choose_index(count: int, dim: int, memory_budget: int = 4 * 2**30) -> str:
    if count < FLAT_BELOW:
        return "Flat"
    if count * dim * 4 * 1.3 < memory_budget:
        return "HNSW32"
    lists = 2 ** round(math.log2(4 * math.sqrt(count)))
    return f"IVF{lists},PQ{max(1, dim // 8)}"


def build_faiss(vectors: np.ndarray, ids: np.ndarray, kind: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The faiss index over `vectors` [N, E] with `ids`, and its settings and measured recall."""
    import faiss

    kind = kind or choose_index(len(vectors), vectors.shape[1])
    index = faiss.index_factory(vectors.shape[1], f"IDMap2,{kind}" if kind in ("Flat", "HNSW32") else kind,
                                faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add_with_ids(vectors, ids)
    settings = {"type": kind, **tune(index, vectors, ids, kind)}
    return index, settings


def _set_search(index: Any, kind: str, value: int) -> None:
    import faiss

    if kind.startswith("HNSW"):
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = value
    elif kind.startswith("IVF"):
        faiss.extract_index_ivf(index).nprobe = value


def tune(index: Any, vectors: np.ndarray, ids: np.ndarray, kind: str, k: int = 10) -> dict[str, Any]:
    """The smallest efSearch / nprobe whose recall@k against exact search on a sample of the vectors
    reaches the target (or the last one within the latency target), and that recall."""
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(vectors), size=min(100, len(vectors)), replace=False)]
    exact = ids[np.argsort(-(sample @ vectors.T), axis=1)[:, :k]]
    if kind == "Flat":
        return {"recall_at_10": 1.0}
    knob = "efSearch" if kind.startswith("HNSW") else "nprobe"
    chosen: dict[str, Any] = {}
    for value in (16, 32, 64, 128, 256, 512):
        _set_search(index, kind, value)
        start = time.perf_counter()
        _, found = index.search(sample, k)
        per_query = (time.perf_counter() - start) / len(sample)
        recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)]))
        chosen = {knob: value, "recall_at_10": recall, "query_ms": 1000 * per_query}
        if recall >= RECALL_TARGET or per_query > LATENCY_TARGET_S:
            break
    return chosen


def apply_settings(index: Any, settings: dict[str, Any]) -> None:
    for knob in ("efSearch", "nprobe"):
        if knob in settings:
            _set_search(index, settings["type"], settings[knob])


def save_faiss(index: Any, path: Path) -> None:
    import faiss

    partial = path.with_name(f".{path.name}.partial")
    faiss.write_index(index, str(partial))
    partial.replace(path)


def read_faiss(path: Path) -> Any:
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # a kind faiss cannot map: read into memory
        return faiss.read_index(str(path))
