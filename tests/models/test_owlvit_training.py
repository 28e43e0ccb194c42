"""OWL-ViT end to end on the shapes world: a tiny detector learns the base shapes (COCO AP through
pycocotools), `vlp detect` and `vlp eval detection` run on it (text and image queries), and bad input
gets one line."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from vlp.cli import main
from vlp.config import apply_overrides
from vlp.train.config import load_run_config
from vlp.train.loop import train

DETECTOR = {
    "model.family": "owlvit", "model.embed_dim": 64,
    "model.vision": "{kind: convnet, image_size: 64, channels: [16, 32, 64, 64]}",
    "model.text": "{vocab_size: 320, context_length: 12, width: 64, layers: 1, heads: 2}",
    "tokenizer.vocab_size": 320, "tokenizer.context_length": 12,
    "image.size": 64, "image.resize_mode": "pad", "data.num_workers": 0, "data.exclude_classes": "[star]",
    "data.mosaic_probs": "[0.7, 0.3]", "train.batch_size": 16, "train.lr": 2e-3, "train.warmup_steps": 20,
    "train.weight_decay": 0.0, "train.log_every": 50, "train.save_every": 1000, "train.progress": False,
    "train.precision": "fp32", "train.lr_scales": "{text: 0.1}",
}


@pytest.fixture(scope="module")
def detector(shapes_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("owl") / "run"
    overrides = [f"{k}={v}" for k, v in {**DETECTOR, "data.train": shapes_world / "instances_train.json",
                                           "train.steps": 200}.items()]
    train(load_run_config(None, overrides), run)
    return run


def _evaluate(checkpoint, world, out, *extra):
    assert main(["eval", "detection", "--checkpoint", str(checkpoint), "--data", str(world / "instances_test.json"),
                 "--novel", "star", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_a_tiny_detector_learns_the_base_shapes(detector, shapes_world, tmp_path):
    metrics = [json.loads(line) for line in (detector / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["giou_loss"] < 0.7 * metrics[0]["giou_loss"]
    result = _evaluate(detector, shapes_world, tmp_path / "eval.json")
    # Measured 0.21 base AP after these 200 steps (0.19 after 170, 0.23 after 250); the untrained detector
    # scores 0 (its boxes are grid cells).
    assert result["metrics"]["AP_base"] > 0.15
    assert set(result["per_class_AP"]) == {"circle", "square", "triangle", "star", "cross"}
    assert "pycocotools" in result["protocol"]
    # It evaluates with the prompts it was trained with, which its checkpoint keeps.
    assert "the detector's own 5 prompt template(s)" in result["protocol"]


def test_detect_writes_boxes_in_image_pixels_and_draws_them(detector, shapes_world, tmp_path, capsys):
    scenes = json.loads((shapes_world / "instances_test.json").read_text())
    image = shapes_world / scenes["images"][0]["file_name"]
    out = tmp_path / "dets.json"
    assert main(["detect", str(image), "--checkpoint", str(detector), "--queries", "circle,square,cross",
                 "--threshold", "0.0", "--top-k", "5", "--out", str(out), "--draw", str(tmp_path / "drawn")]) == 0
    (record,) = json.loads(out.read_text())
    assert len(record["detections"]) == 5
    for detection in record["detections"]:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 48
        assert detection["query"] in {"circle", "square", "cross"}
    assert (tmp_path / "drawn" / f"{image.stem}.detections.png").is_file()
    # Two inputs of one name get two drawings; a query may hold a comma; near-duplicates are suppressed.
    twin = tmp_path / "twin" / image.name
    twin.parent.mkdir()
    twin.write_bytes(image.read_bytes())
    capsys.readouterr()
    assert main(["detect", str(image), str(twin), "--checkpoint", str(detector), "--query", "circle, or square",
                 "--threshold", "0.0", "--out", str(out), "--draw", str(tmp_path / "drawn2")]) == 0
    assert sorted(p.name for p in (tmp_path / "drawn2").iterdir()) == [f"{image.stem}-2.detections.png",
                                                                       f"{image.stem}.detections.png"]
    found = json.loads(out.read_text())[0]["detections"]
    assert {d["query"] for d in found} == {"circle, or square"}
    import torch

    from vlp.geometry import box_iou
    iou = box_iou(torch.tensor([d["box"] for d in found]), torch.tensor([d["box"] for d in found]))[0]
    assert (iou.fill_diagonal_(0) <= 0.3 + 1e-6).all()
    x, y, w, h = next(a["bbox"] for a in scenes["annotations"] if a["image_id"] == scenes["images"][0]["id"])
    capsys.readouterr()
    assert main(["detect", str(image), "--checkpoint", str(detector), "--query-image", str(image),
                 "--query-box", f"{x},{y},{x + w},{y + h}", "--threshold", "0.0", "--nms", "0.3"]) == 0
    assert f"like {image.name} [" in capsys.readouterr().out


def test_one_shot_detection_is_evaluated_with_example_boxes(detector, shapes_world, tmp_path):
    result = _evaluate(detector, shapes_world, tmp_path / "oneshot.json", "--one-shot",
                       str(shapes_world / "instances_train.json"), "--shots", "3", "--limit", "40")
    assert result["images"] == 40 and "one-shot" in result["protocol"]
    assert 0 <= result["metrics"]["AP"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--queries", " , "], "needs --queries"),
    (["--query-image", "IMAGE"], "needs the box x0,y0,x1,y1"),
    (["--query-image", "IMAGE", "--query-box", "1,2,3"], "x0,y0,x1,y1"),
    (["--query-image", "IMAGE", "--query-box", "10,10,400,20"], "not a box inside"),
    (["--queries", "circle", "--query-image", "IMAGE", "--query-box", "1,1,5,5"], "not both"),
])
def test_detect_refuses_bad_queries_in_one_line(detector, shapes_world, capsys, args, message):
    image = str(next((shapes_world / "images" / "test").iterdir()))
    args = [image if a == "IMAGE" else a for a in args]
    assert main(["detect", image, "--checkpoint", str(detector), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_detection_refuses_bad_input_in_one_line(detector, trained_blip, shapes_world, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    for args, message in [
        (["--data", str(broken)], "broken.json"),
        (["--data", str(shapes_world / "instances_test.json"), "--novel", "unicorn"], "unicorn"),
        (["--data", str(shapes_world / "instances_test.json"), "--max-detections", "0"], "--max-detections"),
    ]:
        assert main(["eval", "detection", "--checkpoint", str(detector), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    # A model that cannot detect says so.
    assert main(["detect", str(next((shapes_world / "images" / "test").iterdir())), "--checkpoint",
                 str(trained_blip), "--queries", "circle"]) == 2
    assert "cannot detect objects" in capsys.readouterr().err


def test_grounding_precision_of_the_detector_and_of_an_itm_model(detector, trained_blip, shapes_world, tmp_path):
    refs = str(shapes_world / "refcoco" / "refs(unc).p")
    for checkpoint, method in ((detector, "detector"), (trained_blip, "matching")):
        out = tmp_path / f"{method}.json"
        assert main(["eval", "grounding", "--checkpoint", str(checkpoint), "--refs", refs, "--split", "test",
                     "--limit", "60", "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["expressions"] == 60 and method in result["protocol"]
        metrics = result["metrics"]
        assert set(metrics) == {"precision@1", "random_proposal_precision@1", "largest_proposal_precision@1"}
        assert 0 <= metrics["precision@1"] <= 1


def test_two_processes_follow_one_process(shapes_world, tmp_path):
    """DDP: 2 gloo processes under torchrun, each on half of the global batch, log the losses one process logs."""
    overrides = {**DETECTOR, "data.train": shapes_world / "instances_train.json", "train.steps": 6,
                 "train.log_every": 1, "train.batch_size": 8}
    config = tmp_path / "run.yaml"
    data: dict = {}
    apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vlp",
               "train", "--config", str(config), "--out", str(tmp_path / "two")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    train(load_run_config(config), tmp_path / "one")
    one, two = ([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-3)
