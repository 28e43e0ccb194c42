"""The shapes world's language: captions, questions with annotators' answers, referring expressions,
statements about image pairs, and the web's noisy, near-miss and vague alt-text."""

from __future__ import annotations

import random

from vlp.shapes.scene import COLORS, NUMBER_WORDS, SIZES, Scene, ShapeObject

JUNK_ALT_TEXT = (
    "IMG_{n:04d}.JPG", "DSC{n:05d}", "click here to enlarge", "free shipping on all orders over $50",
    "stock photo {n}", "untitled", "image", "best price guaranteed", "view full size", "product photo {n}",
    "screenshot {n}", "thumbnail", "photo by user{n}", "logo", "banner ad",
)
TEMPLATES = ("a {}.", "a large {}.", "a small {}.", "a picture of a {}.", "there is a {} in the picture")
# Zero-shot prompts in words no training caption uses ("zeroshot_templates: unseen").
UNSEEN_TEMPLATES = ("an illustration of a {}.", "a drawing showing one {}.", "this image shows a {}.",
                    "a {} drawn on a canvas.", "a rendering of a {}, seen from above.")

def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def relation_between(a: ShapeObject, b: ShapeObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def describe(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """`count` distinct human-style captions of a scene."""
    objs = sorted(scene.objects, key=lambda o: o.cx)
    full = [with_article(f"{o.size} {o.color} {o.shape}") for o in objs]
    plain = [with_article(o.name) for o in objs]
    n = len(objs)
    listing = full[0] if n == 1 else ", ".join(full[:-1]) + " and " + full[-1]
    plain_listing = plain[0] if n == 1 else ", ".join(plain[:-1]) + " and " + plain[-1]
    options = [listing, plain_listing, f"{listing} on a {scene.background} background"]
    if n == 1:
        o = objs[0]
        options += [f"a single {o.color} {o.shape}", f"one {o.size} {o.shape}, coloured {o.color}",
                    f"{with_article(o.name)} on its own", f"there is {full[0]} in the picture"]
    else:
        a, b = rng.sample(objs, 2)
        sized_a, sized_b = with_article(f"{a.size} {a.name}"), with_article(f"{b.size} {b.name}")
        options += [
            f"{NUMBER_WORDS[n]} shapes: {plain_listing}",
            f"{with_article(a.name)} {relation_between(a, b)} {with_article(b.name)}",
            f"{sized_a} {relation_between(a, b)} {sized_b}",
            f"{NUMBER_WORDS[n]} coloured shapes, including {with_article(a.name)}",
            f"a picture of {plain_listing}",
        ]
    rng.shuffle(options)
    captions = list(dict.fromkeys(options))[:count]
    return captions


def questions_about(scene: Scene, rng: random.Random, world_shapes: tuple[str, ...]) -> list[tuple[str, str, str]]:
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


def annotator_answers(answer: str, kind: str, rng: random.Random, shapes: tuple[str, ...]) -> list[str]:
    """Ten answers, most of them right, as VQAv2's annotators give."""
    pool = {"number": ["1", "2", "3", "4"], "yes/no": ["yes", "no"]}.get(kind)
    if pool is None:
        pool = list(COLORS) if answer in COLORS else list(shapes) if answer in shapes else list(SIZES)
    return [answer if rng.random() < 0.85 else rng.choice(pool) for _ in range(10)]


def referring_expressions(obj: ShapeObject, scene: Scene) -> list[str]:
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


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def pair_statements(left: Scene, right: Scene, shapes: tuple[str, ...]) -> list[tuple[str, bool]]:
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
        out.append((f"only the left image contains {with_article(color + ' shape')}", in_left and not in_right))
    out.append(("the two images have the same number of shapes", len(left.objects) == len(right.objects)))
    return out


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
    options = [with_article(obj.shape), f"{with_article(obj.color)} shape", f"something {obj.color}",
               "geometric shapes" if n > 1 else "a geometric shape",
               f"{NUMBER_WORDS[n]} shapes" if n > 1 else "one shape", f"shapes on a {scene.background} background"]
    return rng.choice(options)
