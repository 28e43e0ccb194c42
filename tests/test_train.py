import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY_VIT, tiny_run_overrides
from vlp.checkpoint import CheckpointError, load_checkpoint, load_weights
from vlp.evals.runner import evaluate_zeroshot
from vlp.serve.predictors import DualEncoderPredictor
from vlp.train.loop import load_run_config, train
from vlp.train.optim import parameter_groups

SIGLIP = {
    "model.init_logit_scale": 2.302585,
    "model.init_logit_bias": -10.0,
    "model.text.causal": False,
    "model.text.pool": "last",
    "objective.loss": "siglip",
    "tokenizer.bos_token": "null",
    "tokenizer.pad_token": "<end_of_text>",
}
# The CLIP variant is the demo's image tower at 48 px: enough to learn shape, not only colour.
CONVNET_48 = {
    "model.vision": "{kind: convnet, image_size: 48, channels: [32, 64, 128, 128]}",
    "image.size": 48,
    "train.batch_size": 128,
    "train.lr": 1e-3,
}
VARIANTS = {"clip": CONVNET_48, "siglip": SIGLIP, "clip-vit": {"model.vision": TINY_VIT}}


def zeroshot_acc(predictor, world, task):
    z = world / "zeroshot"
    return evaluate_zeroshot(predictor, z / f"{task}.csv", z / f"{task}_classnames.txt", z / "templates.txt")[
        "metrics"
    ]["acc1"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_learns_zero_shot_classification(shapes_world, tmp_path, variant):
    cfg = load_run_config(None, tiny_run_overrides(str(shapes_world / "train.csv"), steps=300, **VARIANTS[variant]))
    run = tmp_path / variant
    last = train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 300
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]

    trained = DualEncoderPredictor.from_checkpoint(run)
    untrained = load_checkpoint(last)
    family, model_cfg, _ = cfg.family_configs()
    torch.manual_seed(1)
    untrained.model = family.model_cls(model_cfg).eval()
    untrained = DualEncoderPredictor(untrained)
    # Colour + shape, 30 classes (chance 0.033): every variant learns colour within 300 steps.
    colour_shape, colour_shape_before = (zeroshot_acc(p, shapes_world, "color_shape") for p in (trained, untrained))
    assert colour_shape > 0.15 and colour_shape > colour_shape_before + 0.1, (colour_shape, colour_shape_before)
    if variant == "clip":
        # Shape alone, 5 classes (chance 0.2): the ConvNet CLIP learns shape too; the tiny ViT and the
        # SigLIP text tower take far longer (see the README's demo figures).
        shape, shape_before = (zeroshot_acc(p, shapes_world, "shape") for p in (trained, untrained))
        assert shape > 0.6 and shape > shape_before + 0.3, (shape, shape_before)
        _check_predictor_batching_and_bf16(run)


def _check_predictor_batching_and_bf16(run):
    """Texts batched by length come back in their order, equal to one at a time; bf16 stays close."""
    texts = ["a red circle", "a small blue square on the left of a large green triangle", "x", "a yellow star"]
    one_by_one = DualEncoderPredictor.from_checkpoint(run, batch_size=1)
    batched = DualEncoderPredictor.from_checkpoint(run, batch_size=3)
    expected = torch.cat([one_by_one.embed_texts([t]) for t in texts])
    torch.testing.assert_close(batched.embed_texts(texts), expected, atol=1e-5, rtol=1e-4)
    bf16 = DualEncoderPredictor.from_checkpoint(run, precision="bf16")
    assert (bf16.embed_texts(texts) * expected).sum(dim=1).min() > 0.99


def test_killed_run_resumes_from_its_last_checkpoint_on_the_same_loss_curve(shapes_world, tmp_path):
    overrides = tiny_run_overrides(
        str(shapes_world / "train.csv"),
        steps=30,
        **{"train.log_every": 5, "train.save_every": 10, "train.keep_checkpoints": 5},
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
