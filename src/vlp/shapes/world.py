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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from vlp.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range
from vlp.flags import option
from vlp.shapes.language import (
    JUNK_ALT_TEXT,
    TEMPLATES,
    UNSEEN_TEMPLATES,
    annotator_answers,
    describe,
    near_miss,
    pair_statements,
    questions_about,
    referring_expressions,
    vague_alt_text,
)
from vlp.shapes.scene import (
    COLORS,
    HELDOUT_COLOR,
    SHAPE_CATALOG,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    object_counts,
    render,
    sample_scene,
)


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
    seed: NonNegativeInt = option(0, help="the world's seed: the same seed writes the same files")
    # Smaller scenes leave no room for three shapes.
    image_size: Annotated[int, Range(min=16)] = option(64, help="image side in pixels")
    train: PositiveInt = option(5000, help="number of train images")
    test: PositiveInt = option(1000, help="number of test images")
    web: PositiveInt = option(3000, help="number of web images (noisy captions)")
    classify: PositiveInt = option(1000, help="number of zero-shot classification images")
    train_captions: PositiveInt = option(3, help="captions per train image")
    test_captions: PositiveInt = option(5, help="captions per test image")
    web_noise: Fraction = option(0.4, help="share of web captions replaced by alt-text junk or another image's caption")
    # Taken from the clean ones: near misses, which only matching colours and shapes to objects can flag.
    web_near_miss: Fraction = option(0.0, help="share of web captions with one colour or shape word changed")
    # Taken from the clean ones: web text that is not wrong, only poor, which a captioner can improve on.
    web_vague: Fraction = option(0.0, help="share of web captions cut to true but vague alt-text, e.g. 'a star'")
    shards: PositiveInt = option(8, help="WebDataset shards per split")
    shapes: list[str] = option(default_factory=lambda: list(SHAPES), metavar="SHAPE",
                               help=f"shapes drawn, of {' '.join(SHAPE_CATALOG)}")
    min_objects: Annotated[int, Range(min=1, max=9)] = option(1, help="fewest objects per scene")
    max_objects: Annotated[int, Range(min=1, max=9)] = option(3, help="most objects per scene")
    object_scale: PositiveFloat = option(1.0, help="object size as a multiple of the default")
    backgrounds: Literal["light", "varied"] = option(
        "light", help="varied: half the backgrounds dark, tinted, striped or checked")
    zeroshot_templates: Literal["seen", "unseen"] = option(
        "seen", help="unseen: zero-shot prompts in wording no training caption uses")
    nlvr_per_image: PositiveInt = option(1, help="NLVR statements per image of a split, each about a fresh random pair")

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


@dataclass
class ShapesWorldCommand:
    """`vlp data shapes`: where to write the world, and its settings as flags."""

    out: str = option(help="the folder to write")
    world: ShapesWorldConfig = option(default_factory=ShapesWorldConfig)


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
                             "sentences": referring_expressions(obj, scene)})
            for q_index, (question, answer, kind) in enumerate(questions_about(scene, rng, shapes)):
                qid = image_id * 10 + q_index
                questions.append({"question_id": qid, "image_id": image_id, "question": question})
                answers.append({"question_id": qid, "image_id": image_id, "answer_type": kind,
                                "question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answer,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(annotator_answers(answer, kind, rng, shapes))]})
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


def _write_nlvr(path: Path, scenes: list[Scene], images: list[dict], rng: random.Random,
                shapes: tuple[str, ...], per_image: int) -> None:
    """`per_image` statements per scene about random pairs of images with true / false labels, half of each,
    in BLIP's NLVR2 layout: a JSON list of {images: [left, right], sentence, label}."""
    pairs = []
    for index in range(len(scenes) * per_image):
        left, right = rng.randrange(len(scenes)), rng.randrange(len(scenes))
        want = index % 2 == 0
        options = [s for s, truth in pair_statements(scenes[left], scenes[right], shapes) if truth == want]
        if options:
            pairs.append({"images": [images[left]["file_name"], images[right]["file_name"]],
                          "sentence": rng.choice(options), "label": want})
    path.write_text(json.dumps(pairs))


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
