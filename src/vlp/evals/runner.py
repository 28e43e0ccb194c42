"""File-level evaluation: read a dataset, call an evaluator with predict functions, name the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.data.sources import read_captions
from vlp.evals.probe import ProbeConfig, frozen_feature_probes, split_train_test
from vlp.evals.retrieval import reranked_retrieval, zeroshot_retrieval
from vlp.evals.zeroshot import check_templates, read_classification_data, read_lines, zeroshot_classification


def evaluate_zeroshot(predictor: Any, data: str | Path, classnames: str | Path, templates: str | Path) -> dict:
    names = read_lines(classnames)
    prompts = check_templates(read_lines(templates), templates)
    paths, labels = read_classification_data(data, names)
    metrics, _ = zeroshot_classification(predictor.embed_images, predictor.embed_texts, paths, labels, names, prompts)
    return {"task": "zeroshot_classification", "dataset": str(data), "metrics": metrics}


def evaluate_retrieval(
    predictor: Any, data: str | Path, images_dir: str | Path | None = None, rerank: int | None = None
) -> dict:
    """Embedding retrieval; with `rerank` k (a predictor with `matcher`), each query's top k are
    re-scored by the image-text matching head as BLIP does (k = 256 for COCO in the paper)."""
    items = read_captions(str(data), images_dir=images_dir)
    images, captions = [i.path for i in items], [i.captions for i in items]
    metrics, similarity = zeroshot_retrieval(predictor.embed_images, predictor.embed_texts, images, captions)
    if not rerank:
        return {"task": "zeroshot_retrieval", "dataset": str(data), "metrics": metrics}
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    reranked = reranked_retrieval(similarity, text_to_image, predictor.matcher(images, texts), rerank)
    return {
        "task": f"reranked_retrieval (k={rerank})",
        "dataset": str(data),
        "metrics": reranked,
        "embedding_metrics": metrics,
    }


def evaluate_probe(
    predictor: Any,
    data: str | Path,
    classnames: str | Path,
    *,
    test: str | Path | None = None,
    test_fraction: float = 0.3,
    cfg: ProbeConfig | None = None,
) -> dict:
    """Linear and attentional probes on frozen image features: trained on `data`, scored on `test`, or
    on a seeded `test_fraction` of `data` when no test set is given."""
    names = read_lines(classnames)
    paths, labels = read_classification_data(data, names)
    if test is None:
        train_paths, train_labels, test_paths, test_labels = split_train_test(paths, labels, test_fraction)
    else:
        (train_paths, train_labels), (test_paths, test_labels) = (paths, labels), read_classification_data(test, names)
    metrics = frozen_feature_probes(
        predictor.embed_images,
        predictor.embed_image_tokens,
        (train_paths, train_labels),
        (test_paths, test_labels),
        len(names),
        cfg,
    )
    return {
        "task": "frozen_feature_probe",
        "dataset": str(data),
        "metrics": metrics,
        "train_images": len(train_paths),
        "test_images": len(test_paths),
    }


def format_table(result: dict) -> str:
    rows = [(name, "n/a" if value is None else f"{value:.4f}") for name, value in result["metrics"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{result['task']} on {result['dataset']}"]
    if "protocol" in result:
        lines.append(f"  ({result['protocol']})")
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def write_result(result: dict, out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
