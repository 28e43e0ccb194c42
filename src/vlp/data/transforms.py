"""Image preprocessing with Pillow, numpy and torch: resize, crops, normalisation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image

from vlp.config import PositiveFloat, PositiveInt, Range

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CropScale = Annotated[float, Range(min=0, max=1, exclusive_min=True)]
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class ImageConfig:
    """Preprocessing that travels with the weights: size, interpolation, normalisation, training crops."""

    size: PositiveInt = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"  # shortest side + centre crop, or stretch
    train_crop_scale: tuple[CropScale, CropScale] = (0.9, 1.0)  # random resized crop area range in training
    train_crop_ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        for key in ("train_crop_scale", "train_crop_ratio"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key} [{low}, {high}] is not a range: the first value is the larger")


class ImageTransform:
    """PIL image -> normalised float tensor [3, size, size].

    Training crops draw from the `rng` passed per call, so a sample's augmentation depends only on
    its seed, not on the worker that loads it: resumed runs see the same crops.
    """

    def __init__(self, cfg: ImageConfig, *, train: bool = False):
        self.cfg = cfg
        self.train = train
        self.resample = _RESAMPLE[cfg.interpolation]
        self.mean = np.asarray(cfg.mean, dtype=np.float32)
        self.std = np.asarray(cfg.std, dtype=np.float32)

    def _random_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        area = width * height
        lo, hi = self.cfg.train_crop_ratio
        for _ in range(10):
            target = area * rng.uniform(*self.cfg.train_crop_scale)
            ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                return x, y, x + w, y + h
        side = min(width, height)
        return self._centre_box(width, height, side, side)

    @staticmethod
    def _centre_box(width: int, height: int, w: float, h: float) -> tuple[float, float, float, float]:
        x, y = (width - w) / 2, (height - h) / 2
        return x, y, x + w, y + h

    def _resize_centre_crop(self, image: Image.Image) -> Image.Image:
        """Shortest side to `size`, then the centre square: the rounding of open_clip and transformers,
        so a loaded checkpoint sees the pixels its reference library would give it."""
        size, (width, height) = self.cfg.size, image.size
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        if new != image.size:
            image = image.resize(new, self.resample)
        left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        size = self.cfg.size
        width, height = image.size
        if self.train:
            box = self._random_box(width, height, rng or random.Random())
            image = image.resize((size, size), self.resample, box=box)
        elif self.cfg.resize_mode == "squash":
            image = image.resize((size, size), self.resample)
        else:
            image = self._resize_centre_crop(image)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - self.mean) / self.std  # [H, W, 3]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())
