"""Image preprocessing with Pillow, numpy and torch: resize, crops, normalisation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image

from vlp.config import Fraction, PositiveFloat, PositiveInt, Range

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CropScale = Annotated[float, Range(min=0, max=1, exclusive_min=True)]
# PIL filters; "antialiased_linear" is scikit-image's resize (Gaussian anti-aliasing, then linear zoom), which
# OWLv2's processor uses: PIL's bilinear stands in for it in training crops.
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "antialiased_linear": Image.Resampling.BILINEAR}


@dataclass
class ImageConfig:
    """Preprocessing that travels with the weights: size, interpolation, normalisation, training crops."""

    size: PositiveInt = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear", "antialiased_linear"] = "bicubic"
    # shortest side + centre crop; stretch; or longest side to `size`, padded bottom/right to a square
    # (detection: the whole image stays, undistorted, and box coordinates only scale).
    resize_mode: Literal["shortest", "squash", "pad"] = "shortest"
    pad_value: Fraction = 0.5  # the padding's grey in [0, 1] pixel space (OWL-ViT trains with 0.5)
    train_crop_scale: tuple[CropScale, CropScale] = (0.9, 1.0)  # random resized crop area range in training
    train_crop_ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.interpolation == "antialiased_linear" and self.resize_mode == "shortest":
            raise ValueError("interpolation 'antialiased_linear' goes with resize_mode 'pad' or 'squash'")
        for key in ("train_crop_scale", "train_crop_ratio"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key} [{low}, {high}] is not a range: the first value is the larger")


def resize_with_pad(image: Image.Image, size: int, pad_value: float, resample: int) -> Image.Image:
    """The longest side to `size` (aspect kept), on a `size` x `size` canvas of grey `pad_value` at the top
    left: a box's normalised coordinates on the canvas are its pixels / max(width, height)."""
    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new != image.size:
        image = image.resize(new, resample)
    grey = round(pad_value * 255)
    canvas = Image.new("RGB", (size, size), (grey, grey, grey))
    canvas.paste(image, (0, 0))
    return canvas


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

    def _antialiased(self, image: Image.Image) -> np.ndarray:
        """OWLv2's preprocessing in [0, 1] floats: pad bottom/right to a square (`pad` mode), then resize with
        a Gaussian of sigma (factor - 1) / 2 and linear interpolation, clipped to the input's range."""
        from scipy import ndimage

        array = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
        if self.cfg.resize_mode == "pad":
            side = max(array.shape[:2])
            array = np.pad(array, ((0, side - array.shape[0]), (0, side - array.shape[1]), (0, 0)),
                           constant_values=self.cfg.pad_value)
        factors = np.divide(array.shape, (self.cfg.size, self.cfg.size, 3))
        filtered = ndimage.gaussian_filter(array, np.maximum(0, (factors - 1) / 2), cval=0, mode="mirror")
        out = ndimage.zoom(filtered, 1 / factors, order=1, mode="mirror", cval=0, grid_mode=True)
        return np.clip(out, array.min(), array.max())

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        if not self.train and self.cfg.interpolation == "antialiased_linear":
            array = (self._antialiased(image) - self.mean) / self.std
            return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32))
        size = self.cfg.size
        width, height = image.size
        if self.train:
            box = self._random_box(width, height, rng or random.Random())
            image = image.resize((size, size), self.resample, box=box)
        elif self.cfg.resize_mode == "squash":
            image = image.resize((size, size), self.resample)
        elif self.cfg.resize_mode == "pad":
            image = resize_with_pad(image, size, self.cfg.pad_value, self.resample)
        else:
            image = self._resize_centre_crop(image)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - self.mean) / self.std  # [H, W, 3]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def input_box_scale(width: int, height: int, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """How an image's pixel coordinates map onto the model input's normalised ones under `cfg`'s resize:
    normalised = pixels * scale + offset per (x, y). `pad`: the longest side spans [0, 1]; `squash`: each
    side does; `shortest`: the shorter side does, the centre crop shifting the other."""
    if cfg.resize_mode == "pad":
        return np.full(2, 1 / max(width, height)), np.zeros(2)
    if cfg.resize_mode == "squash":
        return np.array([1 / width, 1 / height]), np.zeros(2)
    side = min(width, height)
    return np.full(2, 1 / side), -np.array([(width - side) / 2, (height - side) / 2]) / side


def boxes_to_image(boxes: torch.Tensor, width: int, height: int, cfg: ImageConfig) -> torch.Tensor:
    """Normalised xyxy boxes on the model input [N, 4] -> pixel xyxy on the original image, clipped to it."""
    scale, offset = input_box_scale(width, height, cfg)
    scale_t = torch.tensor(np.tile(scale, 2), dtype=boxes.dtype)
    offset_t = torch.tensor(np.tile(offset, 2), dtype=boxes.dtype)
    pixels = (boxes - offset_t) / scale_t
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(pixels.clamp(min=0), limits)


def boxes_to_input(boxes: torch.Tensor, width: int, height: int, cfg: ImageConfig) -> torch.Tensor:
    """Pixel xyxy boxes of an image [N, 4] -> normalised xyxy on the model input (the inverse of
    `boxes_to_image` inside the image)."""
    scale, offset = input_box_scale(width, height, cfg)
    return boxes * torch.tensor(np.tile(scale, 2), dtype=boxes.dtype) + torch.tensor(np.tile(offset, 2),
                                                                                      dtype=boxes.dtype)
