"""Bad input, tried as a user would: each gets one line that says what is wrong and where, a non-zero exit,
and nothing the user had is lost."""

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_run_overrides
from vlp.cli import main
from vlp.config import ConfigError
from vlp.data.sources import DataError, load_image
from vlp.evals import EvalResult
from vlp.train.config import load_run_config
from vlp.train.loop import train


@pytest.fixture(scope="module")
def clip_run(shapes_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("bad-inputs") / "clip"
    train(load_run_config(None, tiny_run_overrides(str(shapes_world / "train.csv"), steps=3)), run)
    return run


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_an_output_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text('{"earlier": "result"}')

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vlp.outputs.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        EvalResult("detection", "x", {"AP": 0.5}).write(out)
    assert out.read_text() == '{"earlier": "result"}'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no partial file left beside it


def test_a_new_run_into_a_finished_run_is_refused_unless_told_to_replace_it(clip_run, shapes_world, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    args = ["train", "--config", str(config), "--out", str(run)]
    args += [a for o in tiny_run_overrides(str(shapes_world / "train.csv"), steps=2) for a in ("--set", o)]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    assert "holds an earlier run" in _one_line(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main([*args, "--overwrite"]) == 0


def test_language_model_folders_never_run_their_code_and_other_models_are_named(tmp_path):
    from vlp.objectives.sources import _read_lm_config

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ConfigError, match="never runs code from a model folder"):
        _read_lm_config(str(remote))
    detector = tmp_path / "owl"
    detector.mkdir()
    (detector / "config.json").write_text(json.dumps({"model_type": "owlvit"}))
    with pytest.raises(ConfigError, match="holds a 'owlvit' model, not a language model") as err:
        _read_lm_config(str(detector))
    assert len(str(err.value)) < 300


def test_a_lock_is_released_when_its_run_dies_even_while_its_forked_workers_live(tmp_path):
    from vlp.train.run_folder import RunLock

    script = textwrap.dedent(f"""
        import os, pathlib, time
        from vlp.train.run_folder import RunLock
        RunLock(pathlib.Path({str(tmp_path)!r})).acquire()
        if os.fork() == 0:  # a data loader worker
            time.sleep(20)
            os._exit(0)
        os._exit(0)  # the run dies without releasing the lock
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    RunLock(tmp_path).acquire().release()


def test_sixteen_bit_greyscale_and_exif_rotated_images_are_read_as_shown(tmp_path):
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(grey)
    assert load_image(grey).getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257, not clipped to white
    photo = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to show
    Image.new("RGB", (40, 20), (200, 10, 10)).save(photo, exif=exif)
    assert load_image(photo).size == (20, 40)


def test_detection_ground_truth_with_bad_boxes_or_none_is_named(tmp_path, caplog):
    from vlp.evals.detection import _load_ground_truth

    data = {"images": [{"id": 1, "file_name": "1.png", "width": 50, "height": 50}],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [-20, 5, 10, 10]},
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},
                            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [5, 5, float("nan"), 10]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    coco = _load_ground_truth(path)
    assert coco.dropped_boxes == 3 and len(coco.dataset["annotations"]) == 1
    assert "3 of 4 boxes dropped" in caplog.text
    del data["annotations"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="is not a COCO instances file"):
        _load_ground_truth(path)


@pytest.mark.parametrize(("flag", "value", "says"), [("--top-k", "-1", "--top-k: -1 is out of range"),
                                                      ("--threshold", "2", "--threshold: 2.0 is out of range"),
                                                      ("--nms", "7", "--nms: 7.0 is out of range")])
def test_detection_options_out_of_range_are_refused(clip_run, tmp_path, capsys, flag, value, says):
    assert main(["detect", "x.png", "--checkpoint", str(clip_run), "--queries", "a", flag, value]) == 2
    assert says in _one_line(capsys)


def test_limits_below_one_are_refused(clip_run, capsys):
    assert main(["eval", "grounding", "--checkpoint", str(clip_run), "--refs", "r.p", "--limit", "0"]) == 2
    assert "--limit: 0 is out of range" in _one_line(capsys)


def test_text_that_is_not_utf8_is_named(clip_run, tmp_path, capsys):
    assert main(["embed", "--checkpoint", str(clip_run), "--texts", "caf\udce9", "--out", str(tmp_path / "e")]) == 2
    assert "--texts" in _one_line(capsys) and "is not UTF-8 text" in capsys.readouterr().err + "is not UTF-8 text"
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"a red circle\ncaf\xe9\n")
    assert main(["embed", "--checkpoint", str(clip_run), "--texts-file", str(texts), "--out", str(tmp_path / "e")]) == 2
    line = _one_line(capsys)
    assert str(texts) in line and "not UTF-8" in line


def test_embeddings_are_written_where_the_message_says(clip_run, tmp_path, capsys):
    assert main(["embed", "--checkpoint", str(clip_run), "--texts", "a red circle", "--out",
                 str(tmp_path / "emb_noext")]) == 0
    assert f"written to {tmp_path / 'emb_noext.npy'}" in capsys.readouterr().out
    assert np.load(tmp_path / "emb_noext.npy").shape[0] == 1


def test_instruction_records_without_an_answer_are_dropped_and_counted(shapes_world, tmp_path):
    from vlp.data.instruction_batches import InstructionDataConfig, training_records
    from vlp.data.sources import BadSamples

    image = next((shapes_world / "images" / "train").iterdir())
    records = [{"image": str(image), "task": "caption", "template": "caption", "answer": "a red circle"}] * 199
    records.append({"image": str(image), "task": "caption", "template": "caption", "answers": ["a circle"]})
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = BadSamples(max_fraction=0.05)
    assert len(training_records(InstructionDataConfig(train=str(path)), bad)) == 199
    assert bad.dropped["bad_record"] == 1


def test_gguf_files_are_named_where_a_checkpoint_is_expected_and_when_cut_short(clip_run, tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 6)
    assert main(["embed", "--checkpoint", str(gguf), "--texts", "a", "--out", str(tmp_path / "e")]) == 2
    assert "is a GGUF language model, not a vision-language checkpoint" in _one_line(capsys)
    assert main(["lm", "convert-gguf", str(gguf), "--out", str(tmp_path / "lm")]) == 2
    line = _one_line(capsys)
    assert "is not a GGUF causal LM transformers can read" in line and "error: error" not in line
    assert not (tmp_path / "lm").exists()


def test_a_damaged_or_malicious_optimizer_state_is_named_on_resume(clip_run, shapes_world, tmp_path, capsys):
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clip_run, run)
    optimizer = run / "checkpoints" / "step_00000003" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    args = ["train", "--out", str(run), "--resume", "latest", "--set", "train.steps=5"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert str(optimizer) in line and "damaged" in line

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    optimizer.write_bytes(pickle.dumps(Payload()))
    assert main(args) == 2
    line = _one_line(capsys)
    assert str(optimizer) in line and "weights_only" not in line and "pwned" not in line


@pytest.mark.parametrize(("override", "says"), [
    ("objective.focal_alpha=7", "objective.focal_alpha"),
    ("train.lr_scales={txet: 0.01}", "'txet' is the start of no parameter's name"),
])
def test_config_values_out_of_range_or_matching_nothing_are_refused(shapes_world, tmp_path, override, says):
    overrides = [f"{k}={v}" for k, v in {"model.preset": "owlvit-tiny", "data.num_workers": 0, "train.steps": 1,
                                         "data.train": shapes_world / "instances_train.json"}.items()]
    if "lr_scales" in override:
        overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=1)
    with pytest.raises(ConfigError, match=says):
        train(load_run_config(None, [*overrides, override]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_prompt_longer_than_the_text_is_refused(shapes_world, tmp_path):
    from conftest import BLIP_TINY

    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=1, **BLIP_TINY)
    with pytest.raises(ConfigError, match="objective.prompt_length': 500 prompt tokens leave nothing"):
        train(load_run_config(None, [*overrides, "objective.prompt_length=500"]), tmp_path / "run")


def test_image_processor_settings_are_read_from_processor_config_too(tmp_path, caplog):
    from vlp.convert.common import hf_image_processor_settings

    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.5] * 3}}))
    settings, path = hf_image_processor_settings(tmp_path)
    assert settings["image_mean"] == [0.5] * 3 and path.name == "processor_config.json"
    (tmp_path / "processor_config.json").unlink()
    assert hf_image_processor_settings(tmp_path)[0] == {}
    assert "no image processor settings" in caplog.text


def test_the_detector_config_leaves_the_dataset_s_classes_to_the_command_line():
    config = yaml.safe_load((Path(__file__).parent.parent / "configs" / "owlvit-tiny.yaml").read_text())
    assert "exclude_classes" not in config["data"]
