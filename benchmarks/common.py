"""What every benchmark shares: the shapes world as real inputs, timing, the matmul ceiling (the machine's
description is `vlp.report.machine`)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from vlp.assets.image import ImageConfig, ImageTransform
from vlp.data.sources import read_csv
from vlp.shapes import ShapesWorldConfig, make_shapes_world


def shapes_pairs(root: Path, count: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """`count` shapes-world images as normalised [N, 3, S, S] pixels, and their captions."""

    def read_pairs() -> list[tuple[Path, str]]:
        if not (root / "train.csv").is_file():
            return []
        return [(item.path, caption) for item in read_csv(root / "train.csv") for caption in item.captions]

    pairs = read_pairs()
    if len(pairs) < count:  # none yet, or the smaller world of a --quick run: a full run would time fewer pairs
        shutil.rmtree(root, ignore_errors=True)
        make_shapes_world(
            root, ShapesWorldConfig(seed=0, image_size=image_size, train=count, test=8, web=8, classify=8, shards=1)
        )
        pairs = read_pairs()
    pairs = pairs[:count]
    transform = ImageTransform(ImageConfig(size=image_size), train=False)  # CLIP's normalisation
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in pairs])
    return pixels, [caption for _, caption in pairs]


def interleaved_times(runners: dict[str, Callable[[int], None]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner, called in turn at every step so that the machine's
    drifting load (this is a shared machine) falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run(step)
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """This machine's dense matmul rate in FLOP/s: the ceiling model FLOP utilisation is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
