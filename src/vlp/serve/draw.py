"""Detections drawn on their images (`vlp detect --draw`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlp.data.sources import load_image

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_detections(images: Sequence[str | Path], detections: Sequence[Sequence[Any]], folder: str | Path) -> list[Path]:
    """Each image with its boxes, query and score drawn, written as `<name>.detections.png` in `folder`
    (a new name, so no input image is ever overwritten). Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, found in zip(images, detections, strict=True):
        picture: Image.Image = load_image(Path(path))
        pen = ImageDraw.Draw(picture)
        for detection in found:
            color = PALETTE[detection.label % len(PALETTE)]
            pen.rectangle(detection.box, outline=color, width=max(1, round(max(picture.size) / 200)))
            pen.text((detection.box[0] + 2, detection.box[1] + 1), f"{detection.query} {detection.score:.2f}",
                     fill=color)
        target = folder / f"{Path(path).stem}.detections.png"
        picture.save(target)
        written.append(target)
    return written
