import io
import json
import logging
import multiprocessing
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import CLIP_STEPS, CONVNET_48, TINY_VIT, tiny_run_overrides
from vlp.assets import IMAGE, Assets
from vlp.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from vlp.config import ConfigError
from vlp.data.sources import DataError
from vlp.distributed import ParallelModel
from vlp.errors import TrainingError
from vlp.objectives.recipes import recipe_of
from vlp.registry import get_family
from vlp.tasks import predict_functions
from vlp.tasks.embedding import EmbeddingPredictor
from vlp.tasks.zeroshot import ZeroShotEvalConfig, evaluate_zeroshot
from vlp.train.config import load_run_config
from vlp.train.loop import train
from vlp.train.optim import make_optimizer, parameter_groups
from vlp.train.step import TrainStep

SIGLIP = {
    "model.init_logit_scale": 2.302585,
    "model.init_logit_bias": -10.0,
    "model.text.causal": False,
    "model.text.pool": "last",
    "objective.loss": "siglip",
    "tokenizer.bos_token": "null",
    "tokenizer.pad_token": "<end_of_text>",
}
VARIANTS = {"clip": CONVNET_48, "siglip": SIGLIP, "clip-vit": {"model.vision": TINY_VIT}}
# Colour + shape zero-shot acc1 measured (bar 0.15): the tiny ViT 0.27 after 150 steps; SigLIP 0.10 after 150,
# so it keeps 300.
STEPS = {"clip": CLIP_STEPS, "siglip": 300, "clip-vit": 150}


def zeroshot_acc(functions, world, task):
    z = world / "zeroshot"
    config = ZeroShotEvalConfig(str(z / f"{task}.csv"), str(z / f"{task}_classnames.txt"), str(z / "templates.txt"))
    return evaluate_zeroshot(functions, config).metrics["acc1"]


@pytest.mark.parametrize("variant", list(VARIANTS))  # the CLIP run is `trained_clip`, shared with the search tests
def test_training_learns_zero_shot_classification(shapes_world, tmp_path, variant, request):
    steps = STEPS[variant]
    cfg = load_run_config(None, tiny_run_overrides(str(shapes_world / "train.csv"), steps=steps, **VARIANTS[variant]))
    if variant == "clip":
        run = request.getfixturevalue("trained_clip")
        last = list_checkpoints(run)[-1]
    else:
        run = tmp_path / variant
        last = train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]

    trained = predict_functions(load_checkpoint(run))
    untrained = load_checkpoint(last)
    family, model_cfg, _ = cfg.family_configs()
    torch.manual_seed(1)
    untrained.model = family.model_cls(model_cfg).eval()
    untrained = predict_functions(untrained)
    # Colour + shape, 30 classes (chance 0.033): every variant learns colour within its steps.
    colour_shape, colour_shape_before = (zeroshot_acc(p, shapes_world, "color_shape") for p in (trained, untrained))
    assert colour_shape > 0.15 and colour_shape > colour_shape_before + 0.1, (colour_shape, colour_shape_before)
    if variant == "clip":
        # Shape alone, 5 classes (chance 0.2): the ConvNet CLIP learns shape too; the tiny ViT and the
        # SigLIP text tower take far longer (see docs/results/clip.md).
        shape, shape_before = (zeroshot_acc(p, shapes_world, "shape") for p in (trained, untrained))
        assert shape > 0.6 and shape > shape_before + 0.3, (shape, shape_before)
        _check_predictor_batching_and_bf16(run)


def _check_predictor_batching_and_bf16(run):
    """Texts batched by length come back in their order, equal to one at a time; bf16 stays close."""
    texts = ["a red circle", "a small blue square on the left of a large green triangle", "x", "a yellow star"]
    one_by_one = EmbeddingPredictor.from_checkpoint(run, batch_size=1)
    batched = EmbeddingPredictor.from_checkpoint(run, batch_size=3)
    expected = torch.cat([one_by_one.embed_texts([t]) for t in texts])
    torch.testing.assert_close(batched.embed_texts(texts), expected, atol=1e-5, rtol=1e-4)
    bf16 = EmbeddingPredictor.from_checkpoint(run, precision="bf16")
    assert (bf16.embed_texts(texts) * expected).sum(dim=1).min() > 0.99


def test_killed_run_resumes_from_its_last_checkpoint_on_the_same_loss_curve(shapes_world, tmp_path):
    overrides = tiny_run_overrides(
        str(shapes_world / "train.csv"),
        steps=30,
        # The run in a subprocess sums in this process's order only with this process's thread count.
        **{"train.log_every": 5, "train.save_every": 10, "train.keep_checkpoints": 5,
           "train.threads": torch.get_num_threads()},
    )
    straight = tmp_path / "straight"
    train(load_run_config(None, overrides), straight)

    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "vlp", "train", "--config", str(config), "--out", str(killed)]
    args += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "step_00000010" / "state.json"
    for _ in range(2400):  # polls up to about two minutes
        if checkpoint.exists():
            break
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    else:
        pytest.fail("no checkpoint at step 10 within the polling window")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step_00000030").exists()
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 12, "loss": 3.1')  # a line the kill cut short

    train(load_run_config(None, overrides), killed, resume="latest")
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra["step"], ra["loss"], rb["loss"])
        assert rb["lr"] == pytest.approx(ra["lr"])
    sa = load_checkpoint(straight).model.state_dict()
    sb = load_checkpoint(killed).model.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5)


def test_no_weight_decay_on_biases_norms_embeddings_and_scalars():
    cfg = load_run_config(None, tiny_run_overrides("unused.csv", steps=1, **{**SIGLIP, "model.vision": TINY_VIT}))
    family, model_cfg, _ = cfg.family_configs()
    model = family.model_cls(model_cfg)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" not in decayed and "logit_bias" not in decayed
    assert not any("bias" in n or "norm" in n or "embedding" in n or "pos_embed" in n for n in decayed)
    assert "visual.blocks.0.attn.qkv_proj.weight" in decayed and "text_projection.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_checkpoint_errors_name_the_problem(shapes_world, tmp_path):
    cfg = load_run_config(None, tiny_run_overrides(str(shapes_world / "train.csv"), steps=2))
    last = train(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no vlp checkpoint"):
        load_checkpoint(tmp_path)
    family, model_cfg, _ = load_run_config(
        None, tiny_run_overrides("x.csv", 1, **{"model.embed_dim": 32})
    ).family_configs()
    with pytest.raises(CheckpointError, match=r"'text_projection.weight' has shape \(64, 64\).*\(32, 64\)"):
        load_weights(family.model_cls(model_cfg), last / "model.safetensors")
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    with pytest.raises(Exception, match="vocab_size"):
        train(
            load_run_config(
                None, tiny_run_overrides(str(shapes_world / "train.csv"), 1, **{"model.text.vocab_size": 16})
            ),
            tmp_path / "small-vocab",
        )


def _tiny_objective(overrides):
    cfg = load_run_config(None, overrides)
    family, model_cfg, objective_cfg = cfg.family_configs()
    torch.manual_seed(0)
    model = family.model_cls(model_cfg)
    parallel = ParallelModel(model, "ddp", torch.device("cpu"))
    objective = recipe_of(family).objective_cls(parallel.module, objective_cfg)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    return model, TrainStep(parallel, objective, optimizer, grad_clip=1.0, precision="fp32"), optimizer


def test_a_step_with_a_non_finite_loss_makes_no_update():
    model, step, optimizer = _tiny_objective(tiny_run_overrides("x.csv", steps=1))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "text": torch.randint(4, 100, (4, 8), generator=g),
             "text_mask": torch.ones(4, 8, dtype=torch.long), "size": 4}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = {**batch, "image": batch["image"].clone()}
    poisoned["image"][0, 0, 0, 0] = float("nan")
    result = step(poisoned)
    assert result.skipped and not torch.isfinite(result.loss)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not optimizer.state  # no moment was updated either
    assert not step(batch).skipped
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_diverging_run_stops_with_an_error_and_never_saves_non_finite_weights(shapes_world, tmp_path):
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=60, **{
        "train.lr": 1e3, "train.warmup_steps": 1, "train.save_every": 2, "train.log_every": 2,
        "train.max_nonfinite_steps": 4, "train.keep_checkpoints": 100})
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"training diverged: 4 steps in a row .* Lower train.lr \(1000\)"):
        train(load_run_config(None, overrides), run)
    for folder in list_checkpoints(run):  # whatever was written holds finite weights and loads
        load_checkpoint(folder)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) >= 1
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_checkpoint(tmp_path / "nan", family=get_family("clip"), model_config=None,
                        model={"w": torch.tensor([1.0, float("nan")])}, assets=Assets())
    assert not (tmp_path / "nan").exists()
    save_file({"w": torch.tensor([float("inf")])}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CheckpointError, match="weight 'w' holds NaN or infinite values"):
        read_weights(tmp_path / "inf.safetensors")


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_runs_lock_is_taken_over(shapes_world, tmp_path):
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=100000, **{"train.save_every": 5})
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vlp", "train", "--config", str(config), "--out", str(run)]
    proc = subprocess.Popen(args + [a for o in overrides for a in ("--set", o)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(2400):
            if (run / "checkpoints" / "step_00000005").exists():
                break
            assert proc.poll() is None, "the first run ended early"
            time.sleep(0.05)
        with pytest.raises(TrainingError, match=rf"run folder {run} is in use by another vlp run \(process {proc.pid}"):
            train(load_run_config(None, overrides), run, resume="latest")
        metrics = (run / "metrics.jsonl").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run / "metrics.jsonl").read_text().startswith(metrics)  # the refused run wrote nothing
    last = train(load_run_config(None, [*overrides, "train.steps=12"]), run, resume="latest")
    assert last.name == "step_00000012" and not (run / "run.lock").exists()


def test_resume_reuses_the_saved_configuration_and_says_what_changed(shapes_world, tmp_path, caplog):
    from vlp.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("model:\n  family: clip\n")
    run = tmp_path / "run"
    overrides = [o for o in tiny_run_overrides("x", steps=4) if not o.startswith("data.train")]
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["train", "--config", str(config), "--data", str(shapes_world / "train.csv"), "--out", str(run),
                 *sets]) == 0
    saved = (run / "run.yaml").read_text()
    # A bad change is refused before anything is written.
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "latest",
                 "--set", "train.batch_size=0"]) == 2
    assert (run / "run.yaml").read_text() == saved
    # The documented resume command (docs/usage.md): no --data; the saved run's data and settings are reused.
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "latest",
                 "--set", "train.steps=6", "--set", "train.lr=0.001"]) == 0
    assert yaml.safe_load((run / "run.yaml").read_text())["data"]["train"] == str(shapes_world / "train.csv")
    assert "train.steps 4 -> 6" in caplog.text and "train.lr 0.002 -> 0.001" in caplog.text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
    # The new rate takes over from the restored optimizer's: lambda(6) of a 20-step warm-up.
    assert records[-1]["lr"] == pytest.approx(0.001 * 7 / 20)
    # Without --config the saved configuration is the whole configuration.
    assert main(["train", "--out", str(run), "--resume", "latest", "--set", "train.steps=8"]) == 0
    folder = resolve_checkpoint(run)
    modes = {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as every other file


def test_skipped_samples_are_counted_by_cause_in_the_metrics_and_the_checkpoint(shapes_world, tmp_path, caplog):
    rows = (shapes_world / "train.csv").read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images = shapes_world / "images" / "train"
    extra = [f"{broken},a red circle"] * 200 + [f"{images / '000001.png'},"] * 10
    data = tmp_path / "train.csv"
    data.write_text("\n".join(rows + extra) + "\n")
    caplog.set_level(logging.INFO, logger="vlp.train")
    overrides = tiny_run_overrides(str(data), steps=6, **{"train.log_every": 3, "train.save_every": 3,
                                                          "train.keep_checkpoints": 5, "data.images": shapes_world})
    run = tmp_path / "run"
    train(load_run_config(None, overrides), run)
    state = json.loads((resolve_checkpoint(run) / "state.json").read_text())
    counts = state["skipped_samples"]
    assert counts["empty_caption"] == 10 and counts["unreadable_image"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_samples"] == sum(counts.values())
    assert records[-1]["skipped/unreadable_image"] == counts["unreadable_image"]
    assert f"skipped samples: unreadable_image {counts['unreadable_image']}, empty_caption 10" in caplog.text
    # A resumed leg carries the failures of the first and reads the file again: the empty captions stay 10.
    train(load_run_config(None, [*overrides, "train.steps=9"]), run, resume="latest")
    resumed = json.loads((resolve_checkpoint(run) / "state.json").read_text())["skipped_samples"]
    assert resumed["empty_caption"] == 10 and resumed["unreadable_image"] >= counts["unreadable_image"]


def test_a_resumed_webdataset_run_continues_the_stream_where_it_stopped(shapes_world, tmp_path):
    """Stopped after 3 steps and resumed, a run on shards sees the batches the uninterrupted run saw."""
    overrides = tiny_run_overrides(str(shapes_world / "shards" / "train-{000000..000003}.tar"), steps=6, **{
        "train.log_every": 1, "train.save_every": 3, "data.num_workers": 0, "data.shuffle_buffer": 50,
        "train.batch_size": 32})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(load_run_config(None, overrides), straight)
    train(load_run_config(None, [*overrides, "train.steps=3"]), stopped)
    state = json.loads((resolve_checkpoint(stopped) / "state.json").read_text())
    assert state["data_position"] == [{"epoch": 0, "consumed": [3]}]  # (tests/data/test_pipeline.py: two workers)
    train(load_run_config(None, overrides), stopped, resume="latest")
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]


def test_a_run_on_shards_stops_its_loader_workers_when_it_ends_or_fails(shapes_world, tmp_path):
    before = set(multiprocessing.active_children())
    train(load_run_config(None, tiny_run_overrides(str(shapes_world / "shards" / "train-{000000..000003}.tar"),
                                                   steps=2, **{"data.num_workers": 2})), tmp_path / "run")
    assert not set(multiprocessing.active_children()) - before
    for shard in range(2):  # shards whose every image is corrupt: the run stops on the bad-sample limit
        with tarfile.open(tmp_path / f"bad-{shard}.tar", "w") as tar:
            for i in range(40):
                for suffix, data in (("png", b"not a png"), ("txt", b"a square")):
                    member = tarfile.TarInfo(f"k{shard}{i:03d}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match="training samples are bad"):
        train(load_run_config(None, tiny_run_overrides(str(tmp_path / "bad-{0..1}.tar"), steps=2,
                                                       **{"data.num_workers": 2, "train.batch_size": 8})),
              tmp_path / "failed")
    assert not set(multiprocessing.active_children()) - before


def test_init_from_refuses_a_family_the_recipe_does_not_start_from(tmp_path):
    """BLIP-VQA starts from a BLIP, as its recipe declares; a CLIP checkpoint is named, not fed to
    `init_from` (which would fail inside the model, on a missing text encoder)."""
    from vlp.assets.image import ImageConfig
    from vlp.checkpoint import Pretrained
    from vlp.config import ConfigError
    from vlp.registry import create_model
    from vlp.train.setup import initialise

    clip = Pretrained(get_family("clip"), None, create_model("clip-tiny"), Assets(image_processors={IMAGE: ImageConfig()}),
                      tmp_path / "clip")
    with pytest.raises(ConfigError, match=r"a BlipVqa cannot start from a DualEncoder checkpoint \(.*clip\)"):
        initialise(create_model("blip-vqa-tiny"), get_family("blip_vqa"), clip)


def test_a_fixed_thread_count_repeats_a_run_bit_for_bit(shapes_world, tmp_path):
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=12, **{"train.threads": 1,
                                                                                 "train.log_every": 4})
    threads = torch.get_num_threads()
    try:
        train(load_run_config(None, overrides), tmp_path / "a")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # the next run starts from another machine's default
        train(load_run_config(None, overrides), tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(tmp_path / "a").model.state_dict(), load_checkpoint(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 3


def test_evaluations_run_on_their_schedule_and_leave_the_training_as_it_was(shapes_world, tmp_path):
    z = shapes_world / "zeroshot"
    evals = {"shape": {"task": "zeroshot", "every": 5, "data": str(z / "shape.csv"),
                       "classnames": str(z / "shape_classnames.txt"), "templates": str(z / "templates.txt")},
             "recall": {"task": "retrieval", "data": str(shapes_world / "captions_test.json")}}
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=10, **{"train.log_every": 5})
    train(load_run_config(None, overrides), tmp_path / "plain")
    train(load_run_config(None, [*overrides, f"evals={json.dumps(evals)}"]), tmp_path / "evaluated")

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    plain, evaluated = records(tmp_path / "plain"), records(tmp_path / "evaluated")
    scores = [r for r in evaluated if any(k.startswith("eval/") for k in r)]
    steps = [r for r in evaluated if "loss" in r]
    assert [r["step"] for r in scores] == [5, 10]
    assert "eval/shape/acc1" in scores[0] and "eval/recall/image_retrieval_recall@1" not in scores[0]
    assert {"eval/shape/acc1", "eval/recall/image_retrieval_recall@1"} <= set(scores[1])
    # Evaluating draws no random number of the training's: its losses are those of the run without them.
    assert [r["loss"] for r in steps] == [r["loss"] for r in plain]
    result = json.loads((tmp_path / "evaluated" / "evals" / "shape" / "step_00000010.json").read_text())
    assert result["task"] == "zeroshot_classification" and result["metrics"]["acc1"] == scores[1]["eval/shape/acc1"]


@pytest.mark.parametrize(("evals", "message"), [
    ({"cap": {"task": "captioning", "data": "x.json"}}, "'evals.cap.task': clip models cannot be evaluated on captioning"),
    ({"z": {"task": "zeroshoot"}}, "'evals.z.task': unknown evaluation 'zeroshoot'"),
    ({"z": {"task": "zeroshot", "data": "d", "classnames": "c"}}, "missing config key 'evals.z.templates'"),
    ({"z": {"task": "retrieval", "data": "d", "rerank": 0}}, "'evals.z.rerank': 0 is out of range"),
    ({"z": {"task": "retrieval", "data": "d", "every": 0}}, "'evals.z.every': 0 is out of range"),
])
def test_a_bad_evaluation_entry_is_refused_before_any_work(shapes_world, tmp_path, evals, message):
    overrides = [*tiny_run_overrides(str(shapes_world / "train.csv"), steps=2), f"evals={json.dumps(evals)}"]
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)
