import json

import numpy as np
import pytest

from conftest import tiny_run_overrides
from vlp.cli import main


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained_run(shapes_world, tmp_path_factory):
    """A few steps from the user's own COCO captions file, through the CLI."""
    out = tmp_path_factory.mktemp("cli-run")
    config = out / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    overrides = [o for o in tiny_run_overrides("x", steps=20) if not o.startswith("data.train")]
    assert main(["train", "--config", str(config), "--data", str(shapes_world / "captions_train.json"),
                 "--out", str(out / "run"), *sets(overrides)]) == 0
    return out / "run"


def test_data_shapes_command(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--seed", "1", "--image-size", "32", "--train", "10",
                 "--test", "5", "--web", "5", "--classify", "30", "--shards", "2"]) == 0
    assert "train 10 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 1


def test_tokenizer_train_command(shapes_world, tmp_path):
    assert main(["tokenizer", "train", "--data", str(shapes_world / "train.csv"), "--out", str(tmp_path),
                 "--set", "tokenizer.vocab_size=300", "--set", "tokenizer.kind=wordpiece"]) == 0
    assert (tmp_path / "tokenizer.json").is_file()


def test_train_from_webdataset_shards_with_a_trained_tokenizer(shapes_world, tmp_path):
    assert main(["tokenizer", "train", "--data", str(shapes_world / "shards" / "train-{000000..000003}.tar"),
                 "--out", str(tmp_path / "tok"), "--set", "tokenizer.vocab_size=400",
                 "--set", "tokenizer.context_length=24"]) == 0
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    overrides = tiny_run_overrides(str(shapes_world / "shards" / "train-{000000..000003}.tar"), steps=5,
                                   **{"tokenizer.path": str(tmp_path / "tok"), "data.num_workers": 2,
                                      "data.shuffle_buffer": 50})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), *sets(overrides)]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000005" / "model.safetensors").is_file()


def test_eval_commands_write_results(trained_run, shapes_world, tmp_path, capsys):
    z = shapes_world / "zeroshot"
    assert main(["eval", "zeroshot", "--checkpoint", str(trained_run), "--data", str(z / "shape.csv"),
                 "--classnames", str(z / "shape_classnames.txt"), "--templates", str(z / "templates.txt"),
                 "--out", str(tmp_path / "zs.json")]) == 0
    result = json.loads((tmp_path / "zs.json").read_text())
    assert result["task"] == "zeroshot_classification"
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert "acc1" in capsys.readouterr().out
    assert main(["eval", "retrieval", "--checkpoint", str(trained_run), "--data",
                 str(shapes_world / "test.csv"), "--out", str(tmp_path / "rt.json")]) == 0
    metrics = json.loads((tmp_path / "rt.json").read_text())["metrics"]
    assert set(metrics) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert all(0 <= v <= 1 for v in metrics.values())


def test_embed_and_classify(trained_run, shapes_world, tmp_path, capsys):
    images = sorted((shapes_world / "images" / "test").glob("*.png"))[:3]
    assert main(["embed", "--checkpoint", str(trained_run), "--images", *map(str, images),
                 "--out", str(tmp_path / "img.npy")]) == 0
    emb = np.load(tmp_path / "img.npy")
    assert emb.shape == (3, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert main(["embed", "--checkpoint", str(trained_run), "--texts", "a red circle", "a blue star",
                 "--out", str(tmp_path / "txt.npy")]) == 0
    assert np.load(tmp_path / "txt.npy").shape == (2, 64)
    capsys.readouterr()
    assert main(["classify", str(images[0]), "--checkpoint", str(trained_run), "--labels", "circle,square,star"]) == 0
    out = capsys.readouterr().out
    assert str(images[0]) in out and "circle" in out


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  family: clip\ntrain:\n  stpes: 3\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.stpes'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # failed before any work
    config.write_text("model:\n  family: clip\n")
    assert main(["train", "--config", str(config), "--data", str(tmp_path / "nope.csv"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path / "none"), "--data", "x.json"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
