import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_VIT, tiny_run_overrides
from vlp.checkpoint import CheckpointError, resolve_checkpoint
from vlp.cli import build_parser, main
from vlp.tasks.embedding import EmbeddingPredictor


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


def _one_line_error(capsys, argv, code=2):
    """Run the CLI; it must fail with `code` and one line on stderr, no traceback. Returns the line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


TRAIN_BAD = [
    ("train.batch_size=0", "'train.batch_size': 0 is out of range (must be >= 1)"),
    ("train.batch_size=-4", "'train.batch_size': -4 is out of range"),
    ("train.accum_steps=0", "'train.accum_steps': 0 is out of range"),
    ("train.save_every=0", "'train.save_every': 0 is out of range"),
    ("train.log_every=0", "'train.log_every': 0 is out of range"),
    ("train.lr=-1", "'train.lr': -1.0 is out of range (must be >= 0)"),
    ("data.num_workers=-1", "'data.num_workers': -1 is out of range"),
    ("train.betas=[0.9, 1.0]", "'train.betas[1]': 1.0 is out of range (must be >= 0 and < 1)"),
    ("model.text.heads=3", "width 64 is not divisible by 3 heads"),
    ("train.device=tpu", "device 'tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("image.size=36", "'image.size': 36 is not a multiple of model.vision.patch_size 8"),
]


@pytest.mark.parametrize(("override", "message"), TRAIN_BAD)
def test_bad_training_settings_stop_before_any_work_with_one_line(shapes_world, tmp_path, capsys, override, message):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=2, **{"model.vision": TINY_VIT})
    line = _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"),
                                    *sets(overrides), "--set", override])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_training_without_data_or_on_a_cuda_that_is_not_there(shapes_world, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    assert "no training data: pass --data" in _one_line_error(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert "training data not found: " in _one_line_error(
        capsys, ["train", "--config", str(config), "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run")])
    if not torch.cuda.is_available():
        line = _one_line_error(capsys, ["train", "--config", str(config), "--data", str(shapes_world / "train.csv"),
                                        "--out", str(tmp_path / "run"), "--set", "train.device=cuda"])
        assert "'train.device': 'cuda', but this machine has no CUDA device" in line
    assert "vlp train needs --config" in _one_line_error(capsys, ["train", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_broken_checkpoint_files_are_named(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(resolve_checkpoint(trained_run), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["embed", "--checkpoint", str(broken), "--texts", "a", "--out", str(tmp_path / "x.npy")]
    assert f"{weights} is not a readable safetensors file" in _one_line_error(capsys, args)
    weights.write_bytes(b"garbage")
    assert "is not a readable safetensors file" in _one_line_error(capsys, args)
    shutil.copy(resolve_checkpoint(trained_run) / "model.safetensors", weights)
    (broken / "model.json").write_text('{"family": "clip", "embed_dim": ')
    assert f"{broken / 'model.json'} is not valid JSON" in _one_line_error(capsys, args)
    # A config that asks for an absurd size is refused before anything is allocated.
    arch = json.loads((resolve_checkpoint(trained_run) / "model.json").read_text())
    arch["text"].update(width=65536, layers=10000, heads=1)
    (broken / "model.json").write_text(json.dumps(arch))
    line = _one_line_error(capsys, args)
    assert "describes a model of" in line and "this machine has" in line and "available" in line
    # The named assets: a broken tokenizer, a preprocessing file that is not JSON, one that is missing.
    shutil.copy(resolve_checkpoint(trained_run) / "model.json", broken / "model.json")
    tokenizer = broken / "tokenizers" / "text" / "tokenizer.json"
    tokenizer.write_text('{"model": ')
    assert f"{tokenizer} is not a readable tokenizer" in _one_line_error(capsys, args)
    shutil.copy(resolve_checkpoint(trained_run) / "tokenizers" / "text" / "tokenizer.json", tokenizer)
    preprocess = broken / "image_processors" / "image" / "preprocess.json"
    preprocess.write_text("{size: ")
    assert f"{preprocess} is not valid JSON" in _one_line_error(capsys, args)
    preprocess.unlink()
    assert f"{broken} is incomplete: its image preprocessing is missing" in _one_line_error(capsys, args)
    assert not (tmp_path / "x.npy").exists()


def test_wrong_command_inputs_are_one_line_errors(trained_run, shapes_world, tmp_path, capsys):
    image = str(min((shapes_world / "images" / "test").glob("*.png")))
    checkpoint = ["--checkpoint", str(trained_run)]
    assert "names no class" in _one_line_error(capsys, ["classify", image, *checkpoint, "--labels", ","])
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo\n")
    line = _one_line_error(capsys, ["classify", image, *checkpoint, "--labels", "circle,star",
                                    "--templates", str(templates)])
    assert f"{templates}: template 2 ('a photo') has no {{}}" in line
    z = shapes_world / "zeroshot"
    line = _one_line_error(capsys, ["eval", "zeroshot", *checkpoint, "--data", str(z / "shape.csv"),
                                    "--classnames", str(z / "shape_classnames.txt"), "--templates", str(templates)])
    assert "template 2" in line
    assert "not both" in _one_line_error(capsys, ["embed", *checkpoint, "--images", image, "--texts", "a",
                                                  "--out", str(tmp_path / "e.npy")])
    # A task the model cannot do names the model and the task.
    line = _one_line_error(capsys, ["caption", image, *checkpoint])
    assert "clip models cannot caption images" in line
    assert "cannot answer questions" in _one_line_error(capsys, ["ask", image, "what is it?", *checkpoint])
    assert "out of range" in _one_line_error(capsys, ["data", "shapes", "--out", str(tmp_path / "w"),
                                                      "--train", "-5"])
    assert not (tmp_path / "w").exists()


def test_unwritable_output_and_a_full_disk_are_named(trained_run, shapes_world, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=2)
    line = _one_line_error(capsys, ["train", "--config", str(config), "--out", str(blocker / "run"),
                                    *sets(overrides)])
    assert str(blocker) in line
    # Read-only folders: root ignores permissions, so the refusal the kernel would give is made here.
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "read-only"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    line = _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "read-only" / "run"),
                                    *sets(overrides)])
    assert line == f"error: Permission denied: {tmp_path / 'read-only' / 'run'}"
    monkeypatch.undo()

    import vlp.checkpoint

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vlp.checkpoint, "save_file", full_disk)
    run = tmp_path / "full"
    line = _one_line_error(capsys, ["train", "--config", str(config), "--out", str(run), *sets(overrides)])
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_00000002'}: No space left on device" in line
    assert not list((run / "checkpoints").glob("*"))  # no half-written checkpoint, no temporary folder left


def test_version_and_debug(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "vlp 0.1.0"
    with pytest.raises(CheckpointError):  # --debug lets the error through, with its traceback
        main(["embed", "--checkpoint", str(tmp_path / "none"), "--texts", "a", "--out", "x.npy", "--debug"])


def test_model_commands_take_a_precision_and_show_progress(trained_run, shapes_world, tmp_path, capsys):
    images = [str(p) for p in sorted((shapes_world / "images" / "test").glob("*.png"))[:5]]
    assert main(["embed", "--checkpoint", str(trained_run), "--images", *images, "--precision", "bf16",
                 "--out", str(tmp_path / "e.npy")]) == 0
    parser = build_parser()
    for command in (["caption", "x.png"], ["ask", "x.png", "q?"], ["eval", "captioning", "--data", "d.json"],
                    ["eval", "vqa", "--questions", "q", "--annotations", "a"], ["eval", "nlvr", "--data", "d"]):
        assert parser.parse_args([*command, "--checkpoint", "c", "--precision", "bf16"]).precision == "bf16"
    predictor = EmbeddingPredictor.from_checkpoint(trained_run, batch_size=2, progress=True)
    capsys.readouterr()
    predictor.embed_images(images)
    assert "embedding images" in capsys.readouterr().err


def test_a_model_that_computes_nan_is_named_not_scored(trained_run, shapes_world):
    """Weights can be finite and still produce NaN (a diverged model): embeddings are checked."""
    from vlp.errors import NonFiniteOutput

    predictor = EmbeddingPredictor.from_checkpoint(trained_run)
    predictor.model.encode_image = lambda pixels: torch.full((len(pixels), 64), float("nan"))
    with pytest.raises(NonFiniteOutput, match=f"{resolve_checkpoint(trained_run)}: the model's image embeddings"):
        predictor.embed_images([min((shapes_world / "images" / "test").glob("*.png"))])
