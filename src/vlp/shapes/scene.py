"""The shapes world's scenes: coloured shapes of two sizes placed without overlap, drawn on a background."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_CATALOG = SHAPES + ("pentagon", "hexagon", "diamond", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SIZES = {"small": 0.14, "large": 0.22}  # radius as a share of the image side
# Never in train or web captions: one pair per shape, so each shape and colour is still seen otherwise.
HELDOUT_COLOR = {"circle": "blue", "square": "yellow", "triangle": "red", "star": "green", "cross": "purple",
                 "pentagon": "orange", "hexagon": "red", "diamond": "yellow", "ring": "green"}
HELDOUT_PAIRS = tuple((HELDOUT_COLOR[shape], shape) for shape in SHAPES)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine"}


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def bbox(self) -> list[float]:
        """COCO [x, y, w, h] in pixels."""
        return [round(self.cx - self.radius, 2), round(self.cy - self.radius, 2),
                round(2 * self.radius, 2), round(2 * self.radius, 2)]


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str  # a word for captions: "light", "dark", "gradient", "noisy"


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape in ("pentagon", "hexagon"):
        sides = 5 if shape == "pentagon" else 6
        return [(cx + r * math.cos(-math.pi / 2 + i * 2 * math.pi / sides),
                 cy + r * math.sin(-math.pi / 2 + i * 2 * math.pi / sides)) for i in range(sides)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def _background(rng: random.Random, size: int, backgrounds: str = "light") -> tuple[Image.Image, str]:
    """Light backgrounds of varied tint and texture. Small ViTs trained from scratch learn shape far
    more slowly when backgrounds also vary in brightness, so the shapes stay the salient thing;
    `backgrounds: varied` adds dark, tinted, striped and checked ones."""
    if backgrounds == "varied" and rng.random() < 0.5:
        return _varied_background(rng, size)
    kind = rng.choice(("plain", "pastel", "gradient", "grainy"))
    grey = rng.randint(190, 240)
    if kind == "plain":
        return Image.new("RGB", (size, size), tuple(grey + rng.randint(-6, 6) for _ in range(3))), kind
    if kind == "pastel":
        return Image.new("RGB", (size, size), tuple(min(255, grey + rng.randint(-25, 15)) for _ in range(3))), kind
    if kind == "gradient":
        top = [min(255, grey + rng.randint(-15, 15)) for _ in range(3)]
        bottom = [min(255, max(0, t + rng.randint(-30, 30))) for t in top]
        gradient = Image.linear_gradient("L").resize((size, size))
        return Image.composite(Image.new("RGB", (size, size), tuple(bottom)),
                               Image.new("RGB", (size, size), tuple(top)), gradient), kind
    # Seeded from the scene's generator: PIL's own noise would break determinism by seed.
    noise = np.random.default_rng(rng.getrandbits(32)).normal(grey, 8, (size, size)).clip(0, 255)
    return Image.fromarray(noise.astype(np.uint8)).convert("RGB"), kind


def _varied_background(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """Dark, muted-colour and two-tone patterned backgrounds; muted, so no shape colour disappears."""
    kind = rng.choice(("dark", "tinted", "striped", "checked"))
    if kind == "dark":
        grey = rng.randint(25, 80)
        return Image.new("RGB", (size, size), tuple(grey + rng.randint(-8, 8) for _ in range(3))), kind
    base = rng.randint(90, 170)
    tint = tuple(base + rng.randint(-35, 35) for _ in range(3))
    if kind == "tinted":
        return Image.new("RGB", (size, size), tint), kind
    other = tuple(min(255, max(0, t + rng.choice((-1, 1)) * rng.randint(25, 45))) for t in tint)
    period = max(2, size // rng.randint(4, 10))
    y, x = np.mgrid[:size, :size] // period
    mask = (y % 2 == 0) if kind == "striped" else ((x + y) % 2 == 0)
    pixels = np.where(mask[..., None], np.array(tint, np.uint8), np.array(other, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8)), kind


def object_counts(min_objects: int, max_objects: int) -> list[int]:
    """The counts a scene draws from: each count twice, a single object once (more scenes with relations)."""
    return [n for n in range(min_objects, max_objects + 1) for _ in range(1 if n == 1 else 2)]


def sample_scene(rng: random.Random, image_size: int, *, allow_heldout: bool, shapes: tuple[str, ...] = SHAPES,
                 counts: list[int] | None = None, object_scale: float = 1.0) -> Scene:
    count = rng.choice(counts or object_counts(1, 3))
    heldout = {(HELDOUT_COLOR[shape], shape) for shape in shapes}
    objects: list[ShapeObject] = []
    used: set[tuple[str, str]] = set()
    while len(objects) < count:
        shape, color = rng.choice(shapes), rng.choice(list(COLORS))
        if (color, shape) in used or (not allow_heldout and (color, shape) in heldout):
            continue
        size = rng.choice(list(SIZES))
        radius = SIZES[size] * image_size * object_scale
        for _ in range(50):
            cx = rng.uniform(radius + 1, image_size - radius - 1)
            cy = rng.uniform(radius + 1, image_size - radius - 1)
            if all(math.hypot(cx - o.cx, cy - o.cy) > radius + o.radius + 1 for o in objects):
                objects.append(ShapeObject(shape, color, size, cx, cy, radius))
                used.add((color, shape))
                break
        else:
            break  # no room left: keep the scene with fewer objects
    return Scene(objects, background="")


def render(scene: Scene, rng: random.Random, image_size: int, backgrounds: str = "light") -> Image.Image:
    """Draw at twice the size and downsample, for smooth edges."""
    scale = 2
    image, scene.background = _background(rng, image_size * scale, backgrounds)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[obj.color])
        elif obj.shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=COLORS[obj.color], width=max(1, round(r * 0.4)))
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=COLORS[obj.color])
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)
