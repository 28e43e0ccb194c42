"""The demo's claim as a test; `make test-slow` runs it with the other slow tests."""

import pytest

from vlp.convert import load_pretrained
from vlp.shapes import ShapesWorldConfig, make_shapes_world
from vlp.tasks import predict_functions
from vlp.tasks.zeroshot import ZeroShotEvalConfig, evaluate_zeroshot
from vlp.train.config import load_run_config
from vlp.train.loop import train


@pytest.mark.slow
def test_tiny_clip_config_reaches_90_percent_zero_shot_shape_accuracy(tmp_path):
    world = tmp_path / "shapes"
    make_shapes_world(world, ShapesWorldConfig(seed=0))
    cfg = load_run_config("configs/clip-tiny.yaml", [f"data.train={world / 'train.csv'}", "train.progress=false"])
    train(cfg, tmp_path / "clip")
    z = world / "zeroshot"
    config = ZeroShotEvalConfig(str(z / "shape.csv"), str(z / "shape_classnames.txt"), str(z / "templates.txt"))
    metrics = evaluate_zeroshot(predict_functions(load_pretrained(tmp_path / "clip")), config).metrics
    assert metrics["acc1"] >= 0.9, metrics
