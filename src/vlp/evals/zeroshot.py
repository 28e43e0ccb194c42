"""Zero-shot classification with CLIP_benchmark's protocol and metric names."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.data.sources import IMAGE_EXTENSIONS, DataError
from vlp.evals import EmbedFn, image_text_similarity


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty")
    return lines


def check_templates(templates: list[str], where: str | Path) -> list[str]:
    """Templates must each hold the class name's place, `{}` or `{c}` (CLIP_benchmark's)."""
    for number, template in enumerate(templates, start=1):
        if "{}" not in template and "{c}" not in template:
            raise DataError(f"{where}: template {number} ({template!r}) has no {{}} or {{c}} for the class name")
    return templates


def read_classification_data(data: str | Path, classnames: list[str]) -> tuple[list[Path], list[int]]:
    """An ImageFolder directory (one subfolder per class) or a CSV with `filepath,label` columns."""
    data = Path(data)
    index = {name: i for i, name in enumerate(classnames)}
    paths, labels = [], []
    if data.is_dir():
        folders = sorted(p for p in data.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{data} has no class subfolders")
        for folder in folders:
            label = index.get(folder.name, index.get(folder.name.replace("_", " ")))
            if label is None:
                raise DataError(f"class folder '{folder.name}' in {data} is not among the class names")
            for file in sorted(folder.iterdir()):
                if file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    paths.append(file)
                    labels.append(label)
    elif data.is_file():
        with data.open(newline="") as f:
            reader = csv.DictReader(f)
            if not {"filepath", "label"} <= set(reader.fieldnames or []):
                raise DataError(f"{data} must have columns filepath,label (has {reader.fieldnames})")
            for row_no, row in enumerate(reader, start=2):
                name = row["label"]
                label = index.get(name)
                if label is None and name.isdigit() and int(name) < len(classnames):
                    label = int(name)
                if label is None:
                    raise DataError(f"{data} line {row_no}: label '{name}' is not among the class names")
                file = Path(row["filepath"])
                paths.append(file if file.is_absolute() else data.parent / file)
                labels.append(label)
    else:
        raise DataError(f"classification data not found: {data}")
    if not paths:
        raise DataError(f"{data} holds no images")
    return paths, labels


def class_embeddings(embed_texts: EmbedFn, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, E]: per class, the renormalised mean of its normalised template embeddings."""
    texts = [t.replace("{c}", name).replace("{}", name) for name in classnames for t in templates]
    emb = F.normalize(embed_texts(texts).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """acc1, acc5 and mean_per_class_recall as CLIP_benchmark computes them: top-k accuracy from `topk`,
    acc5 undefined (None; CLIP_benchmark writes NaN) with fewer than five classes, and the balanced
    accuracy of the `argmax` predictions (sklearn's `balanced_accuracy_score`: the mean recall over the
    classes that have test images). `topk` and `argmax` may break ties between equal logits differently."""
    num_classes = logits.shape[1]
    topk = logits.topk(min(5, num_classes), dim=1).indices
    acc1 = (topk[:, 0] == labels).float().mean().item()
    acc5 = (topk == labels[:, None]).any(dim=1).float().mean().item() if num_classes >= 5 else None
    predictions = logits.argmax(dim=1)
    recalls = [(predictions[labels == c] == c).float().mean().item() for c in labels.unique()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def zeroshot_classification(
    embed_images: EmbedFn,
    embed_texts: EmbedFn,
    images: Sequence,
    labels: Sequence[int],
    classnames: list[str],
    templates: list[str],
) -> tuple[dict[str, float], torch.Tensor]:
    """Returns (metrics, logits [N, C]). Logits use CLIP_benchmark's fixed scale of 100."""
    logits = zeroshot_classifier(embed_images, embed_texts, classnames, templates)(images)
    return classification_metrics(logits, torch.as_tensor(list(labels))), logits


def zeroshot_classifier(
    embed_images: EmbedFn, embed_texts: EmbedFn, classnames: list[str], templates: list[str]
) -> EmbedFn:
    """A function of images -> class logits [N, C] at CLIP_benchmark's fixed scale of 100 (the class
    embeddings are computed once, here)."""
    classifier = class_embeddings(embed_texts, classnames, templates)

    def logits(images: Sequence) -> torch.Tensor:
        return 100.0 * image_text_similarity(embed_images(images), classifier)

    return logits
