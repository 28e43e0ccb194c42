import csv
import hashlib
import json
import re

import pytest
from PIL import Image

from vlp.config import ConfigError, from_dict
from vlp.data.sources import read_coco_captions, read_csv
from vlp.shapes import ShapesWorldConfig, make_shapes_world
from vlp.shapes.scene import COLORS, HELDOUT_PAIRS, SHAPES


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    cfg = ShapesWorldConfig(seed=5, image_size=32, train=20, test=10, web=10, classify=30, shards=2)
    make_shapes_world(tmp_path / "a", cfg)
    make_shapes_world(tmp_path / "b", cfg)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    cfg.seed = 6
    make_shapes_world(tmp_path / "c", cfg)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_heldout_pairs_never_in_training_captions_but_in_test(shapes_world):
    heldout = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    for split in ("train", "web"):
        captions = json.loads((shapes_world / f"captions_{split}.json").read_text())["annotations"]
        assert not any(h in c["caption"] for c in captions for h in heldout)
        objects = json.loads((shapes_world / f"instances_{split}.json").read_text())["annotations"]
        assert not any(o["name"] in heldout for o in objects)
    objects = json.loads((shapes_world / "instances_test.json").read_text())["annotations"]
    with_heldout = {o["image_id"] for o in objects if o["name"] in heldout}
    assert with_heldout
    subset = json.loads((shapes_world / "captions_test_heldout.json").read_text())
    assert {i["id"] for i in subset["images"]} == with_heldout
    assert {c["image_id"] for c in subset["annotations"]} == with_heldout


def test_formats_agree_and_captions_per_split(shapes_world):
    coco = read_coco_captions(shapes_world / "captions_train.json")
    csv_items = read_csv(shapes_world / "train.csv")
    assert [(i.path, i.captions) for i in coco] == [(i.path, i.captions) for i in csv_items]
    assert all(len(i.captions) == 3 and i.path.is_file() for i in coco)
    assert all(len(i.captions) == 5 for i in read_coco_captions(shapes_world / "captions_test.json"))
    assert all(len(i.captions) == 1 for i in read_coco_captions(shapes_world / "captions_web.json"))
    assert len(list((shapes_world / "shards").glob("train-*.tar"))) == 4


def test_boxes_questions_refs_and_web_truth(shapes_world):
    instances = json.loads((shapes_world / "instances_test.json").read_text())
    assert {c["name"] for c in instances["categories"]} == {"circle", "square", "triangle", "star", "cross"}
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48
    questions = json.loads((shapes_world / "vqa" / "questions_test.json").read_text())["questions"]
    answers = json.loads((shapes_world / "vqa" / "annotations_test.json").read_text())["annotations"]
    assert len(questions) == len(answers) and all(len(a["answers"]) == 10 for a in answers)
    assert {a["answer_type"] for a in answers} <= {"number", "yes/no", "other"}
    refs = json.loads((shapes_world / "refs_test.json").read_text())
    assert all(r["sentences"] and len(r["bbox"]) == 4 for r in refs)
    pairs = json.loads((shapes_world / "instances_pairs_test.json").read_text())
    assert len(pairs["categories"]) == 30
    names = {c["id"]: c["name"] for c in pairs["categories"]}
    assert [names[a["category_id"]] for a in pairs["annotations"]] == [a["name"] for a in instances["annotations"]]
    assert [a["bbox"] for a in pairs["annotations"]] == [a["bbox"] for a in instances["annotations"]]
    truth = json.loads((shapes_world / "web_truth.json").read_text())
    kinds = {t["kind"] for t in truth}
    assert kinds == {"clean", "junk", "swapped"}
    noisy = sum(t["noisy"] for t in truth) / len(truth)
    assert 0.2 < noisy < 0.6
    web = {i.key: i.captions[0] for i in read_coco_captions(shapes_world / "captions_web.json")}
    assert all(web[t["file_name"]] == t["caption"] for t in truth)
    assert all(t["caption"] == t["clean_caption"] for t in truth if not t["noisy"])


def test_zeroshot_sets(shapes_world):
    with (shapes_world / "zeroshot" / "shape.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150 and {r["label"] for r in rows} == {"circle", "square", "triangle", "star", "cross"}
    classes = (shapes_world / "zeroshot" / "color_shape_classnames.txt").read_text().split("\n")
    with (shapes_world / "zeroshot" / "color_shape_heldout.csv").open() as f:
        heldout = list(csv.DictReader(f))
    assert heldout and all(r["label"] in classes for r in heldout)


def test_options_make_a_differently_rendered_world(tmp_path):
    cfg = ShapesWorldConfig(seed=2, image_size=96, train=60, test=30, web=60, classify=45, shards=2,
                            shapes=["circle", "pentagon", "hexagon", "diamond", "ring"], min_objects=2,
                            max_objects=5, object_scale=0.7, backgrounds="varied", zeroshot_templates="unseen",
                            web_near_miss=0.3)
    manifest = make_shapes_world(tmp_path, cfg)
    assert manifest["shapes"] == cfg.shapes and manifest["heldout_pairs"][1] == "orange pentagon"
    instances = json.loads((tmp_path / "instances_train.json").read_text())
    assert [c["name"] for c in instances["categories"]] == cfg.shapes
    per_image = {}
    for ann in instances["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        assert ann["name"].split()[1] in cfg.shapes
    assert set(per_image.values()) <= {2, 3, 4, 5} and max(per_image.values()) == 5
    captions = " ".join(c["caption"] for c in json.loads((tmp_path / "captions_train.json").read_text())["annotations"])
    assert "orange pentagon" not in captions and "four shapes" in captions
    assert any(f"{kind} background" in captions for kind in ("dark", "tinted", "striped", "checked"))
    templates = (tmp_path / "zeroshot" / "templates.txt").read_text()
    for word in ("illustration", "drawing", "shows", "canvas", "rendering"):
        assert word in templates and word not in captions
    assert (tmp_path / "zeroshot" / "shape_classnames.txt").read_text().split() == cfg.shapes
    with (tmp_path / "zeroshot" / "scenes.csv").open() as f:
        scenes = list(csv.DictReader(f))
    with (tmp_path / "zeroshot" / "shape.csv").open() as f:
        assert [(r["filepath"], r["label"]) for r in csv.DictReader(f)] == [(r["filepath"], r["shape"]) for r in scenes]
    assert {r["size"] for r in scenes} == {"small", "large"}
    # half the backgrounds varied, and each image's row says which: a dark one is dark, a light one light
    light = {"plain", "pastel", "gradient", "grainy"}
    kinds = {r["background"] for r in scenes}
    assert kinds & {"dark", "tinted", "striped", "checked"} and kinds & light
    for r in scenes:
        corner = Image.open(tmp_path / "zeroshot" / r["filepath"]).convert("L").getpixel((0, 0))
        if r["background"] == "dark":
            assert corner < 100
        elif r["background"] in light:
            assert corner > 140
    assert len(json.loads((tmp_path / "instances_pairs_test.json").read_text())["categories"]) == 30


def test_near_miss_web_captions_name_a_colour_or_shape_the_image_lacks(tmp_path):
    make_shapes_world(tmp_path, ShapesWorldConfig(seed=4, image_size=48, train=5, test=5, web=300, classify=30,
                                                  shards=1, web_noise=0.2, web_near_miss=0.3))
    truth = json.loads((tmp_path / "web_truth.json").read_text())
    objects = json.loads((tmp_path / "instances_web.json").read_text())["annotations"]
    near = [t for t in truth if t["kind"] == "near_miss"]
    assert 0.2 < len(near) / len(truth) < 0.4 and all(t["noisy"] for t in near)
    for t in near:
        before, after = t["clean_caption"].split(" "), t["caption"].split(" ")
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1
        new_word = changed[0][1].strip(",.:")
        present = {w for o in objects if o["image_id"] == t["image_id"] for w in o["name"].split()}
        assert new_word not in present


def test_vague_web_captions_are_true_but_name_no_object_in_full(tmp_path):
    small = {"seed": 4, "image_size": 48, "train": 5, "test": 5, "web": 300, "classify": 30, "shards": 1,
             "web_noise": 0.2}
    make_shapes_world(tmp_path, ShapesWorldConfig(**small, web_vague=0.4))
    truth = json.loads((tmp_path / "web_truth.json").read_text())
    assert 0.1 < sum(t["noisy"] for t in truth) / len(truth) < 0.3
    vague = [t for t in truth if t["kind"] == "vague"]
    assert 0.3 < len(vague) / len(truth) < 0.5 and not any(t["noisy"] for t in vague)
    objects = json.loads((tmp_path / "instances_web.json").read_text())["annotations"]
    colors, shapes = set(COLORS), set(SHAPES)
    for t in vague:
        present = [o["name"].split() for o in objects if o["image_id"] == t["image_id"]]
        words = set(t["caption"].split())
        assert not any(c in words and s in words for c, s in present)  # no object named in full
        assert words & colors <= {c for c, _ in present} and words & shapes <= {s for _, s in present}
    assert {t["caption"] for t in vague} & {"a star", "three shapes", "geometric shapes"}


def test_more_nlvr_statements_per_image_extend_the_default_ones(tmp_path):
    small = {"seed": 3, "image_size": 32, "train": 40, "test": 10, "web": 5, "classify": 30, "shards": 1}
    make_shapes_world(tmp_path / "one", ShapesWorldConfig(**small))
    make_shapes_world(tmp_path / "four", ShapesWorldConfig(**small, nlvr_per_image=4))
    one, four = (json.loads((tmp_path / w / "nlvr_train.json").read_text()) for w in ("one", "four"))
    assert len(one) == 40 and len(four) == 160 and four[:40] == one
    assert sum(p["label"] for p in four) == 80  # half true
    assert len({(*p["images"], p["sentence"]) for p in four}) > 150
    assert (tmp_path / "one" / "train.csv").read_bytes() == (tmp_path / "four" / "train.csv").read_bytes()


@pytest.mark.parametrize("fields, message", [
    ({"shapes": ["circle", "blob"]}, "shapes"),
    ({"shapes": ["circle"]}, "two or more"),
    ({"min_objects": 4, "max_objects": 2}, "min_objects (4) > max_objects (2)"),
    ({"max_objects": 12}, "max_objects"),
    ({"web_noise": 0.8, "web_near_miss": 0.5}, "web_noise + web_near_miss"),
    ({"web_noise": 0.4, "web_vague": 0.7}, "web_noise + web_near_miss + web_vague = 1.1 > 1"),
])
def test_bad_world_options_are_refused(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ShapesWorldConfig, fields)
