"""The shapes world: vlp's bundled dataset of 2-D scenes, deterministic by seed.

Each scene holds 1-3 coloured shapes of two sizes on a light background. One generator writes every
format the library reads (CSV, COCO captions, WebDataset) and the files later tasks need: COCO
instances (boxes), VQAv2-style questions with 10 answers, referring expressions with boxes (also in
RefCOCO's layout, `refcoco/`), a noisy
`web` split with its truth file, and zero-shot classification sets. Some colour-shape pairs never
appear in `train` or `web`, so generalisation to new compositions can be measured on `test`.

Options render differently made worlds, to try a config on data it was not tuned on: more objects per
scene, other image and object sizes, dark, tinted and patterned backgrounds, shapes beyond the five
(`SHAPE_CATALOG`), zero-shot prompts in wording no training caption uses, and near-miss web captions (one
colour or shape word changed), the noise only a fine-grained matcher can flag, and vague web captions
(true, but naming no object in full), the poor alt-text a captioner can improve on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import pickle
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageDraw

from vlp.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range

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
JUNK_ALT_TEXT = (
    "IMG_{n:04d}.JPG", "DSC{n:05d}", "click here to enlarge", "free shipping on all orders over $50",
    "stock photo {n}", "untitled", "image", "best price guaranteed", "view full size", "product photo {n}",
    "screenshot {n}", "thumbnail", "photo by user{n}", "logo", "banner ad",
)
TEMPLATES = ("a {}.", "a large {}.", "a small {}.", "a picture of a {}.", "there is a {} in the picture")
# Zero-shot prompts in words no training caption uses ("zeroshot_templates: unseen").
UNSEEN_TEMPLATES = ("an illustration of a {}.", "a drawing showing one {}.", "this image shows a {}.",
                    "a {} drawn on a canvas.", "a rendering of a {}, seen from above.")
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


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def relation_between(a: ShapeObject, b: ShapeObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def describe(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """`count` distinct human-style captions of a scene."""
    objs = sorted(scene.objects, key=lambda o: o.cx)
    full = [_article(f"{o.size} {o.color} {o.shape}") for o in objs]
    plain = [_article(o.name) for o in objs]
    n = len(objs)
    listing = full[0] if n == 1 else ", ".join(full[:-1]) + " and " + full[-1]
    plain_listing = plain[0] if n == 1 else ", ".join(plain[:-1]) + " and " + plain[-1]
    options = [listing, plain_listing, f"{listing} on a {scene.background} background"]
    if n == 1:
        o = objs[0]
        options += [f"a single {o.color} {o.shape}", f"one {o.size} {o.shape}, coloured {o.color}",
                    f"{_article(o.name)} on its own", f"there is {full[0]} in the picture"]
    else:
        a, b = rng.sample(objs, 2)
        sized_a, sized_b = _article(f"{a.size} {a.name}"), _article(f"{b.size} {b.name}")
        options += [
            f"{NUMBER_WORDS[n]} shapes: {plain_listing}",
            f"{_article(a.name)} {relation_between(a, b)} {_article(b.name)}",
            f"{sized_a} {relation_between(a, b)} {sized_b}",
            f"{NUMBER_WORDS[n]} coloured shapes, including {_article(a.name)}",
            f"a picture of {plain_listing}",
        ]
    rng.shuffle(options)
    captions = list(dict.fromkeys(options))[:count]
    return captions


def _questions(scene: Scene, rng: random.Random, world_shapes: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(question, answer, answer_type) triples about a scene."""
    objs = scene.objects
    out = [("how many shapes are there?", str(len(objs)), "number")]
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            out.append((f"what color is the {o.shape}?", o.color, "other"))
        if colors.count(o.color) == 1:
            out.append((f"what shape is the {o.color} object?", o.shape, "other"))
        out.append((f"what size is the {o.color} {o.shape}?", o.size, "other"))
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(world_shapes)
    out.append((f"is there a {color} {shape}?", "yes" if (color, shape) in present else "no", "yes/no"))
    rng.shuffle(out)
    return out[:4]


def _annotator_answers(answer: str, kind: str, rng: random.Random, shapes: tuple[str, ...]) -> list[str]:
    """Ten answers, most of them right, as VQAv2's annotators give."""
    pool = {"number": ["1", "2", "3", "4"], "yes/no": ["yes", "no"]}.get(kind)
    if pool is None:
        pool = list(COLORS) if answer in COLORS else list(shapes) if answer in shapes else list(SIZES)
    return [answer if rng.random() < 0.85 else rng.choice(pool) for _ in range(10)]


def _referring(obj: ShapeObject, scene: Scene) -> list[str]:
    """Expressions that each denote `obj` alone in its scene, RefCOCO-style: by attributes ("the red
    circle"), by position ("the circle on the left") and by relation to another object ("the circle to the
    left of the blue square"). A scene never holds two objects of one colour and shape."""
    others = [o for o in scene.objects if o is not obj]
    same_shape = [o for o in others if o.shape == obj.shape]
    sentences = [f"the {obj.color} {obj.shape}", f"the {obj.size} {obj.color} {obj.shape}"]
    if not same_shape:
        sentences.append(f"the {obj.shape}")
    if not any(o.color == obj.color for o in others):
        sentences.append(f"the {obj.color} shape")
    if others:
        xs = sorted(o.cx for o in scene.objects)
        if obj.cx == xs[0]:
            sentences.append(f"the {obj.shape} on the left")
        elif obj.cx == xs[-1]:
            sentences.append(f"the {obj.shape} on the right")
    for other in others:
        relation = relation_between(obj, other)
        sentences.append(f"the {obj.color} {obj.shape} {relation} the {other.color} {other.shape}")
        # The shape alone with a relation, where no other object of that shape stands in the same relation.
        if all(relation_between(o, other) != relation for o in same_shape if o is not other):
            sentences.append(f"the {obj.shape} {relation} the {other.color} {other.shape}")
    return list(dict.fromkeys(sentences))


def _write_refcoco(folder: Path, splits: dict[str, tuple[list[dict], list[dict], list[dict]]],
                   categories: list[dict]) -> None:
    """The referring expressions in lichengunc/refer's layout: `refs(unc).p` (a pickled list of refs with
    their sentences and split) and `instances.json` (COCO images, annotations, categories), image and
    annotation ids made unique over the splits (test images get ids after the training ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    sent_ids = itertools.count()
    for split, (split_images, split_annotations, split_refs) in splits.items():
        image_offset, ann_offset = len(images), len(annotations)
        images += [{**i, "id": i["id"] + image_offset} for i in split_images]
        annotations += [{**a, "id": a["id"] + ann_offset, "image_id": a["image_id"] + image_offset}
                        for a in split_annotations]
        for ref in split_refs:
            sentences = [{"sent_id": next(sent_ids), "raw": sentence, "sent": sentence, "tokens": sentence.split()}
                         for sentence in ref["sentences"]]
            refs.append({"ref_id": len(refs), "ann_id": ref["ann_id"] + ann_offset,
                         "image_id": ref["image_id"] + image_offset, "category_id": ref["category_id"],
                         "split": split, "file_name": ref["file_name"], "sentences": sentences,
                         "sent_ids": [s["sent_id"] for s in sentences]})
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_shards(folder: Path, prefix: str, samples: list[tuple[str, bytes, str, dict]], num_shards: int) -> str:
    """img2dataset layout: per sample `<key>.png`, `<key>.txt`, `<key>.json`. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(len(samples) / num_shards)
    for shard in range(num_shards):
        with tarfile.open(folder / f"{prefix}-{shard:06d}.tar", "w") as tar:
            for key, png, caption, meta in samples[shard * per_shard:(shard + 1) * per_shard]:
                for ext, payload in (("png", png), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0  # byte-identical shards for the same seed
                    tar.addfile(info, io.BytesIO(payload))
    return f"{folder.name}/{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


@dataclass
class ShapesWorldConfig:
    seed: NonNegativeInt = 0
    image_size: Annotated[int, Range(min=16)] = 64  # smaller scenes leave no room for three shapes
    train: PositiveInt = 5000
    test: PositiveInt = 1000
    web: PositiveInt = 3000
    classify: PositiveInt = 1000
    train_captions: PositiveInt = 3
    test_captions: PositiveInt = 5
    web_noise: Fraction = 0.4  # share of web captions replaced by alt-text junk or another image's caption
    # Share of web captions (taken from the clean ones) with one colour or shape word changed to one the
    # image does not hold: near misses, which only matching colours and shapes to objects can flag.
    web_near_miss: Fraction = 0.0
    # Share of web captions (taken from the clean ones) cut to true but vague alt-text that names no
    # object's colour and shape together ("a star", "three shapes"): web text that is not wrong, only poor,
    # which a captioner can improve on (CapFilt's C).
    web_vague: Fraction = 0.0
    shards: PositiveInt = 8
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # any of SHAPE_CATALOG
    min_objects: Annotated[int, Range(min=1, max=9)] = 1
    max_objects: Annotated[int, Range(min=1, max=9)] = 3
    object_scale: PositiveFloat = 1.0  # object radii as a multiple of 0.14 / 0.22 of the image side
    backgrounds: Literal["light", "varied"] = "light"  # varied: half of them dark, tinted, striped or checked
    zeroshot_templates: Literal["seen", "unseen"] = "seen"  # unseen: prompts in words no caption uses
    nlvr_per_image: PositiveInt = 1  # NLVR statements per image of a split, each about a fresh random pair

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(SHAPE_CATALOG))
        if unknown or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ValueError(f"shapes: need two or more distinct names of {', '.join(SHAPE_CATALOG)}; "
                             f"got {', '.join(self.shapes)}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.web_noise + self.web_near_miss + self.web_vague > 1:
            raise ValueError(f"web_noise + web_near_miss + web_vague = "
                             f"{self.web_noise + self.web_near_miss + self.web_vague} > 1")

    @property
    def pair_names(self) -> tuple[str, ...]:
        return tuple(f"{color} {shape}" for shape in self.shapes for color in COLORS)

    @property
    def heldout_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((HELDOUT_COLOR[shape], shape) for shape in self.shapes)


def make_shapes_world(out: str | Path, cfg: ShapesWorldConfig) -> dict:
    """Write the shapes world under `out`; returns the manifest (also written as manifest.json)."""
    out = Path(out)
    rng = random.Random(cfg.seed)
    shapes, pair_names = tuple(cfg.shapes), cfg.pair_names
    manifest: dict = {"seed": cfg.seed, "image_size": cfg.image_size, "shapes": list(shapes),
                      "colors": list(COLORS), "sizes": list(SIZES),
                      "heldout_pairs": [f"{c} {s}" for c, s in cfg.heldout_pairs], "files": {}}
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(shapes)]
    pair_categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(pair_names)]
    counts = object_counts(cfg.min_objects, cfg.max_objects)
    referring: dict[str, tuple[list[dict], list[dict], list[dict]]] = {}
    for split in ("train", "test", "web"):
        count = getattr(cfg, split)
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, captions, instances, refs, questions, answers = [], [], [], [], [], []
        scenes: list[Scene] = []
        pngs: list[bytes] = []
        for index in range(count):
            image_id = index + 1
            scene = sample_scene(rng, cfg.image_size, allow_heldout=split == "test", shapes=shapes, counts=counts,
                                 object_scale=cfg.object_scale)
            picture = render(scene, rng, cfg.image_size, cfg.backgrounds)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
            file_name = f"images/{split}/{image_id:06d}.png"
            (out / file_name).write_bytes(pngs[-1])
            scenes.append(scene)
            images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size,
                           "height": cfg.image_size})
            n_caps = {"train": cfg.train_captions, "test": cfg.test_captions, "web": 1}[split]
            for caption in describe(scene, rng, n_caps):
                captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
            for obj in scene.objects:
                ann_id = len(instances) + 1
                instances.append({"id": ann_id, "image_id": image_id, "category_id": shapes.index(obj.shape) + 1,
                                  "bbox": obj.bbox, "area": round(obj.bbox[2] * obj.bbox[3], 2), "iscrowd": 0,
                                  "color": obj.color, "size": obj.size, "name": obj.name})
                refs.append({"ref_id": len(refs) + 1, "ann_id": ann_id, "image_id": image_id,
                             "file_name": file_name, "bbox": obj.bbox, "category_id": shapes.index(obj.shape) + 1,
                             "sentences": _referring(obj, scene)})
            for q_index, (question, answer, kind) in enumerate(_questions(scene, rng, shapes)):
                qid = image_id * 10 + q_index
                questions.append({"question_id": qid, "image_id": image_id, "question": question})
                answers.append({"question_id": qid, "image_id": image_id, "answer_type": kind,
                                "question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answer,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(_annotator_answers(answer, kind, rng, shapes))]})
        if split == "web":
            captions, truth = _corrupt_web(captions, images, scenes, cfg, rng)
            (out / "web_truth.json").write_text(json.dumps(truth, indent=1))
        info = {"description": f"vlp shapes world, {split} split", "seed": cfg.seed}
        (out / f"captions_{split}.json").write_text(json.dumps(
            {"info": info, "images": images, "annotations": captions}))
        _write_csv(out / f"{split}.csv", ("filepath", "title"),
                   [(images[c["image_id"] - 1]["file_name"], c["caption"]) for c in captions])
        (out / f"instances_{split}.json").write_text(json.dumps(
            {"info": info, "images": images, "annotations": instances, "categories": categories}))
        # The same boxes with colour-shape pairs as classes: 30 classes, for open-vocabulary detection of a
        # pair that training never boxed, from colours and shapes it did.
        (out / f"instances_pairs_{split}.json").write_text(json.dumps(
            {"info": info, "images": images, "categories": pair_categories,
             "annotations": [{**a, "category_id": pair_names.index(a["name"]) + 1} for a in instances]}))
        (out / f"refs_{split}.json").write_text(json.dumps(refs))
        if split != "web":
            referring[split] = (images, instances, refs)
        vqa = out / "vqa"
        vqa.mkdir(exist_ok=True)
        (vqa / f"questions_{split}.json").write_text(json.dumps({"info": info, "questions": questions}))
        (vqa / f"annotations_{split}.json").write_text(json.dumps({"info": info, "annotations": answers}))
        if split != "test":  # shards are a training format
            shard_samples = [
                (f"{c['image_id']:06d}_{c['id']:07d}", pngs[c["image_id"] - 1], c["caption"],
                 {"image_id": c["image_id"], "caption": c["caption"]}) for c in captions]
            manifest["files"][f"shards_{split}"] = _write_shards(out / "shards", split, shard_samples, cfg.shards)
        if split == "test":
            heldout = {f"{c} {s}" for c, s in cfg.heldout_pairs}
            keep = {i + 1 for i, s in enumerate(scenes) if any(o.name in heldout for o in s.objects)}
            (out / "captions_test_heldout.json").write_text(json.dumps({
                "info": info, "images": [i for i in images if i["id"] in keep],
                "annotations": [c for c in captions if c["image_id"] in keep]}))
        if split != "web":
            # Its own random stream, so that adding it left every other file of a seed as it was.
            _write_nlvr(out / f"nlvr_{split}.json", scenes, images, random.Random(f"{cfg.seed}-nlvr-{split}"),
                        shapes, cfg.nlvr_per_image)
        manifest[split] = {"images": count, "captions": len(captions), "objects": len(instances),
                           "questions": len(questions)}
    _write_refcoco(out / "refcoco", referring, categories)
    _write_zeroshot(out, cfg, rng)
    manifest["classify"] = {"images": cfg.classify}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _pair_statements(left: Scene, right: Scene, shapes: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(statement, truth) about a pair of scenes, NLVR2-style."""
    def count(scene: Scene, shape: str) -> int:
        return sum(o.shape == shape for o in scene.objects)

    out = []
    for shape in shapes:
        a, b = count(left, shape), count(right, shape)
        out.append((f"the left image has more {_plural(shape)} than the right image", a > b))
        out.append((f"the right image has more {_plural(shape)} than the left image", b > a))
        out.append((f"both images contain a {shape}", a > 0 and b > 0))
    for color in COLORS:
        in_left, in_right = (any(o.color == color for o in s.objects) for s in (left, right))
        out.append((f"only the left image contains {_article(color + ' shape')}", in_left and not in_right))
    out.append(("the two images have the same number of shapes", len(left.objects) == len(right.objects)))
    return out


def _write_nlvr(path: Path, scenes: list[Scene], images: list[dict], rng: random.Random,
                shapes: tuple[str, ...], per_image: int) -> None:
    """`per_image` statements per scene about random pairs of images with true / false labels, half of each,
    in BLIP's NLVR2 layout: a JSON list of {images: [left, right], sentence, label}."""
    pairs = []
    for index in range(len(scenes) * per_image):
        left, right = rng.randrange(len(scenes)), rng.randrange(len(scenes))
        want = index % 2 == 0
        options = [s for s, truth in _pair_statements(scenes[left], scenes[right], shapes) if truth == want]
        if options:
            pairs.append({"images": [images[left]["file_name"], images[right]["file_name"]],
                          "sentence": rng.choice(options), "label": want})
    path.write_text(json.dumps(pairs))


def near_miss(caption: str, scene: Scene, shapes: tuple[str, ...], rng: random.Random) -> str | None:
    """The caption with one colour or shape word changed to a colour or shape no object of the scene has,
    so that it is false of the image while reading like its true captions; None if it names neither."""
    words = caption.split(" ")
    present_colors = {o.color for o in scene.objects}
    present_shapes = {o.shape for o in scene.objects}
    bare = [w.strip(",.:") for w in words]
    spots = [(i, w) for i, w in enumerate(bare) if w in COLORS or w in shapes]
    if not spots:
        return None
    index, word = rng.choice(spots)
    choices = ([c for c in COLORS if c not in present_colors] if word in COLORS
               else [s for s in shapes if s not in present_shapes])
    if not choices:
        return None
    words[index] = words[index].replace(word, rng.choice(choices))
    return " ".join(words)


def vague_alt_text(scene: Scene, rng: random.Random) -> str:
    """A caption true of the scene that names at most one attribute of one object, or only how many there
    are: the poor but not wrong alt-text of web images."""
    obj = rng.choice(scene.objects)
    n = len(scene.objects)
    options = [_article(obj.shape), f"{_article(obj.color)} shape", f"something {obj.color}",
               "geometric shapes" if n > 1 else "a geometric shape",
               f"{NUMBER_WORDS[n]} shapes" if n > 1 else "one shape", f"shapes on a {scene.background} background"]
    return rng.choice(options)


def _corrupt_web(captions: list[dict], images: list[dict], scenes: list[Scene], cfg: ShapesWorldConfig,
                 rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Replace a share of web captions by junk alt-text or another image's caption, and shares of the
    others by near misses and by vague alt-text; keep the truth."""
    clean = [c["caption"] for c in captions]
    # Near misses and vague ones are drawn from the captions left clean, at the rates that make them
    # `web_near_miss` and `web_vague` of all.
    near_miss_rate = cfg.web_near_miss / (1 - cfg.web_noise) if cfg.web_noise < 1 else 0.0
    vague_rate = cfg.web_vague / (1 - cfg.web_noise) if cfg.web_noise < 1 else 0.0
    truth = []
    for c in captions:
        kind = "clean"
        if rng.random() < cfg.web_noise:
            if rng.random() < 0.5:
                kind = "junk"
                c["caption"] = rng.choice(JUNK_ALT_TEXT).format(n=rng.randint(1, 99999))
            else:
                kind = "swapped"
                other = rng.randrange(len(captions) - 1)
                other += other >= c["image_id"] - 1
                c["caption"] = clean[other]
        elif near_miss_rate or vague_rate:
            # One draw decides both, so a world without vague captions is the one it was before the option.
            draw = rng.random()
            if draw < near_miss_rate:
                changed = near_miss(c["caption"], scenes[c["image_id"] - 1], tuple(cfg.shapes), rng)
                if changed is not None:
                    kind, c["caption"] = "near_miss", changed
            elif draw < near_miss_rate + vague_rate:
                kind, c["caption"] = "vague", vague_alt_text(scenes[c["image_id"] - 1], rng)
        truth.append({"image_id": c["image_id"], "file_name": images[c["image_id"] - 1]["file_name"],
                      "caption": c["caption"], "clean_caption": clean[c["image_id"] - 1],
                      "noisy": kind not in ("clean", "vague"), "kind": kind})
    return captions, truth


def _write_zeroshot(out: Path, cfg: ShapesWorldConfig, rng: random.Random) -> None:
    """Single-shape images labelled by shape and by colour + shape, for `vlp eval zeroshot`; `scenes.csv`
    gives each image's object size and background, to split the accuracy by what a model finds hard."""
    folder = out / "zeroshot"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = [(c, s) for s in cfg.shapes for c in COLORS]
    rows_shape, rows_pair, rows_heldout, rows_scene = [], [], [], []
    for index in range(cfg.classify):
        color, shape = pairs[index % len(pairs)]
        size = rng.choice(list(SIZES))
        radius = SIZES[size] * cfg.image_size * cfg.object_scale
        cx = rng.uniform(radius + 1, cfg.image_size - radius - 1)
        cy = rng.uniform(radius + 1, cfg.image_size - radius - 1)
        scene = Scene([ShapeObject(shape, color, size, cx, cy, radius)], background="")
        name = f"images/{index + 1:06d}.png"
        render(scene, rng, cfg.image_size, cfg.backgrounds).save(folder / name)
        rows_scene.append((name, shape, color, size, scene.background))
        rows_shape.append((name, shape))
        rows_pair.append((name, f"{color} {shape}"))
        if (color, shape) in cfg.heldout_pairs:
            rows_heldout.append((name, f"{color} {shape}"))
    _write_csv(folder / "shape.csv", ("filepath", "label"), rows_shape)
    _write_csv(folder / "color_shape.csv", ("filepath", "label"), rows_pair)
    _write_csv(folder / "color_shape_heldout.csv", ("filepath", "label"), rows_heldout)
    _write_csv(folder / "scenes.csv", ("filepath", "shape", "color", "size", "background"), rows_scene)
    (folder / "shape_classnames.txt").write_text("\n".join(cfg.shapes) + "\n")
    (folder / "color_shape_classnames.txt").write_text("\n".join(f"{c} {s}" for c, s in pairs) + "\n")
    templates = TEMPLATES if cfg.zeroshot_templates == "seen" else UNSEEN_TEMPLATES
    (folder / "templates.txt").write_text("\n".join(templates) + "\n")
