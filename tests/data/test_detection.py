"""Detection data: the COCO instances reader and its bad input, OWL-ViT's augmentation (crops that keep
boxes, padding, mosaics, merging), per-image query lists with pseudo-negatives, the collate, and box
coordinates through padding and resizing."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.assets.image import ImageConfig, ImageTransform, boxes_to_image, boxes_to_input
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.config import ConfigError
from vlp.data.detection import (
    DetectionCollate,
    DetectionDataConfig,
    DetectionDataset,
    _merge_overlapping,
    canonical_label,
    random_crop,
    read_coco_instances,
)
from vlp.data.sources import BadSamples, DataError

RED = (220, 40, 40)


def _write(tmp_path, annotations, images=None, categories=None, name="instances.json"):
    images = images or [{"id": 1, "file_name": "a.png", "width": 80, "height": 40}]
    categories = categories or [{"id": 1, "name": "Red_Box"}, {"id": 2, "name": "star"}, {"id": 3, "name": "disc"}]
    for entry in images:
        picture = Image.new("RGB", (entry["width"], entry["height"]), (200, 200, 200))
        picture.paste(Image.new("RGB", (20, 20), RED), (10, 5))
        picture.save(tmp_path / entry["file_name"])
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _ann(id, bbox, category=1, image=1, **extra):
    return {"id": id, "image_id": image, "category_id": category, "bbox": bbox, "iscrowd": 0, **extra}


def test_reader_keeps_good_boxes_and_names_every_bad_one(tmp_path):
    path = _write(tmp_path, [
        _ann(1, [10, 5, 20, 20]),
        _ann(2, [0, 0, 0, 5]),  # empty
        _ann(3, [70, 0, 30, 10]),  # outside the 80 px image
        _ann(4, [1, 1, 2, 2], category=9),  # unknown category
        _ann(5, [1, 1, 2, 2], image=7),  # unknown image
        _ann(6, [1, 1, "x", 2]),  # not numbers
        _ann(7, [1, 1, 5, 5], iscrowd=1),  # crowd: dropped, not bad
        _ann(8, [40, 10, 10, 10], category=2),  # a star: excluded below
    ])
    bad = BadSamples(max_fraction=1.0)
    data = read_coco_instances(path, exclude=("star",), bad=bad)
    (image,) = data.images
    assert image.boxes == [(10.0, 5.0, 30.0, 25.0)] and image.labels == ["red box"]
    assert bad.dropped["bad_annotation"] == 5
    assert any("annotation 3" in e and "outside" in e for e in bad.examples)
    assert data.frequency == {"red box": 1}
    with pytest.raises(ConfigError, match="unicorn"):
        read_coco_instances(path, exclude=("unicorn",))
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(DataError, match="broken.json"):
        read_coco_instances(tmp_path / "broken.json")


def test_labels_are_canonicalised_as_owl_vit_does():
    assert canonical_label("Ball_(Sports)") == "ball sports"
    assert canonical_label("  T--shirt!! ") == "t-shirt"


def test_random_crop_keeps_boxes_with_most_of_their_area():
    image = Image.new("RGB", (100, 100))
    boxes = np.array([[0.0, 0.0, 50.0, 50.0], [60.0, 60.0, 100.0, 100.0]])
    rng = random.Random(3)
    for _ in range(50):
        cropped, kept, labels = random_crop(image, boxes, ["a", "b"], rng, area=(0.3, 1.0), ratio=(0.75, 1.33),
                                            min_box_fraction=0.6)
        width, height = cropped.size
        assert len(kept) == len(labels)
        assert (kept[:, [0, 2]] >= 0).all() and (kept[:, [0, 2]] <= width).all()
        assert (kept[:, [1, 3]] >= 0).all() and (kept[:, [1, 3]] <= height).all()
        for box, label in zip(kept, labels, strict=True):
            original = boxes[["a", "b"].index(label)]
            original_area = np.prod(original[2:] - original[:2])
            assert np.prod(box[2:] - box[:2]) >= 0.6 * original_area - 1e-6


def test_instances_overlapping_beyond_the_threshold_merge_their_labels():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30]], dtype=float)
    merged, labels = _merge_overlapping(boxes, [["a"], ["b"], ["c"]], 0.9, random.Random(0))
    assert len(merged) == 2 and sorted(map(sorted, labels)) == [["a", "b"], ["c"]]


def _dataset(tmp_path, **overrides):
    path = _write(tmp_path, [_ann(1, [10, 5, 20, 20])], categories=[
        {"id": 1, "name": "red box"}, {"id": 2, "name": "star"}, {"id": 3, "name": "disc"}, {"id": 4, "name": "cup"}])
    data = read_coco_instances(path)
    data.frequency.update({"disc": 5, "cup": 1, "star": 2})  # as if other images boxed them
    settings = {"flip": False, "crop_area": (1.0, 1.0), "crop_ratio": (2.0, 2.0), "mosaic_probs": (1.0,)}
    cfg = DetectionDataConfig(train=str(path), **{**settings, **overrides})
    transform = ImageTransform(ImageConfig(size=64, resize_mode="pad", mean=(0, 0, 0), std=(1, 1, 1)))
    return DetectionDataset(data, cfg, transform, seed=0)


def test_an_example_is_padded_bottom_right_and_its_boxes_scale_with_the_longest_side(tmp_path):
    item = _dataset(tmp_path)[(0, 0)]  # the 80 x 40 image, cropped whole (aspect 2)
    image = item["image"]
    assert image.shape == (3, 64, 64)
    assert torch.allclose(image[:, 40:, :], torch.full_like(image[:, 40:, :], 128 / 255))  # the grey padding
    cx, cy, w, h = item["boxes"][0].tolist()
    assert (cx, cy, w, h) == pytest.approx((20 / 80, 15 / 80, 20 / 80, 20 / 80))
    # The red square is where its box says, in the model input.
    x0, y0 = round((cx - w / 2) * 64) + 1, round((cy - h / 2) * 64) + 1
    assert image[0, y0, x0].item() == pytest.approx(RED[0] / 255, abs=0.05)
    assert item["queries"][0] in {p.format("red box") for p in DetectionDataConfig().prompts}
    assert item["labels"] == [[0]]


def test_queries_are_positives_then_negatives_without_excluded_or_unexhaustive_classes(tmp_path):
    dataset = _dataset(tmp_path, num_negatives=50, prompts=("{}",))
    dataset.data.images[0].not_exhaustive = ["cup"]
    dataset.data.images[0].negatives = ["star"]  # listed as absent (LVIS neg_category_ids)
    item = dataset[(0, 0)]
    assert item["queries"][0] == "red box"
    assert sorted(item["queries"][1:]) == ["disc", "star"]  # 'cup' may be present unlabelled
    limited = _dataset(tmp_path, num_negatives=1, prompts=("{}",))
    drawn = {limited[(0, epoch)]["queries"][1] for epoch in range(60)}
    assert drawn <= {"disc", "cup", "star"} and "disc" in drawn  # drawn by how often each class is boxed


def test_examples_depend_only_on_seed_epoch_and_index(tmp_path):
    dataset = _dataset(tmp_path, flip=True, crop_area=(0.3, 1.0), crop_ratio=(0.75, 1.33),
                       mosaic_probs=(0.5, 0.5))
    a, b = dataset[(0, 4)], dataset[(0, 4)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"]) and a["queries"] == b["queries"]


def test_a_mosaic_places_each_tile_and_its_boxes_in_its_cell(tmp_path):
    dataset = _dataset(tmp_path, mosaic_probs=(0.0, 1.0), prompts=("{}",))
    item = dataset[(0, 1)]
    assert len(item["boxes"]) == 4  # the same image drawn four times into a 2 x 2 grid of 32 px tiles
    centres = sorted((round(cx * 64), round(cy * 64)) for cx, cy, _, _ in item["boxes"].tolist())
    assert centres == [(8, 6), (8, 38), (40, 6), (40, 38)]
    assert item["boxes"][:, 2].tolist() == pytest.approx([20 / 80 / 2] * 4)


def test_the_collate_pads_query_lists_and_marks_the_real_ones(tmp_path):
    tokenizer = train_tokenizer(["red box", "disc", "star", "cup", "a photo of a"] * 20,
                                TokenizerConfig(vocab_size=300, context_length=8))
    one = {"image": torch.zeros(3, 8, 8), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": [[0, 1]],
           "queries": ["red box", "disc"]}
    two = {"image": torch.zeros(3, 8, 8), "boxes": torch.zeros(0, 4), "labels": [], "queries": ["star", "cup", "disc"]}
    batch = DetectionCollate(tokenizer)([one, two, {"bad": "x"}])
    assert batch["text"].shape == (2, 3, 8) and batch["size"] == 2 and batch["bad"] == ["x"]
    assert batch["query_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["box_mask"].tolist() == [[True], [False]]
    assert batch["labels"][0, 0].tolist() == [1, 1, 0] and batch["labels"][1].sum() == 0
    assert torch.equal(batch["text"][1, 0], tokenizer(["star"])[0][0])


@pytest.mark.parametrize("mode", ["pad", "squash", "shortest"])
def test_boxes_round_trip_between_image_pixels_and_the_model_input(mode):
    cfg = ImageConfig(size=96, resize_mode=mode)
    boxes = torch.tensor([[30.0, 10.0, 70.0, 35.0], [45.0, 2.0, 55.0, 38.0]])
    normalised = boxes_to_input(boxes, 100, 40, cfg)
    assert torch.allclose(boxes_to_image(normalised, 100, 40, cfg), boxes, atol=1e-4)
    if mode == "pad":
        assert torch.allclose(normalised[0], torch.tensor([0.3, 0.1, 0.7, 0.35]))
    if mode == "shortest":  # the centre crop: x shifted by (100 - 40) / 2
        assert torch.allclose(normalised[0], torch.tensor([0.0, 0.25, 1.0, 0.875]))


def test_excluded_classes_can_take_their_images_with_them(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 80, "height": 40},
              {"id": 2, "file_name": "b.png", "width": 80, "height": 40}]
    path = _write(tmp_path, [_ann(1, [10, 5, 20, 20]), _ann(2, [40, 5, 10, 10], category=2),
                             _ann(3, [10, 5, 20, 20], image=2)], images=images)
    unboxed = read_coco_instances(path, exclude=("star",))
    assert [len(i.boxes) for i in unboxed.images] == [1, 1]  # the star's image stays, without its box
    unseen = read_coco_instances(path, exclude=("star",), exclude_images=True)
    assert [i.image_id for i in unseen.images] == [2]
