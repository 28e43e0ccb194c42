"""Training at scale: gradient accumulation that keeps negatives, and `torchrun` with two processes."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import TINY_VIT, tiny_run_overrides
from vlp.checkpoint import list_checkpoints, load_checkpoint
from vlp.config import apply_overrides
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig
from vlp.towers import TextConfig, VisionConfig
from vlp.train.config import load_run_config
from vlp.train.loop import train
from vlp.train.step import accumulated_backward, split_batch


def _tiny_model(siglip: bool) -> DualEncoder:
    torch.manual_seed(0)
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    text = TextConfig(vocab_size=50, context_length=8, width=24, layers=1, heads=2)
    return DualEncoder(
        DualEncoderConfig(embed_dim=16, vision=vision, text=text, init_logit_bias=-10.0 if siglip else None)
    )


def _batch(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, 16, 16, generator=g),
        "text": torch.randint(0, 50, (n, 8), generator=g),
        "text_mask": torch.ones(n, 8, dtype=torch.long),
        "size": n,
    }


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(loss):
    grads = []
    for accum in (1, 4):
        model = _tiny_model(loss == "siglip")
        objective = ContrastiveObjective(model, ContrastiveObjectiveConfig(loss=loss))
        batch = _batch(32)
        if accum == 1:
            value = objective(batch)["contrastive_loss"]
            value.backward()
        else:
            micro = split_batch(batch, accum)
            assert [m["size"] for m in micro] == [8] * 4
            value, _ = accumulated_backward(
                objective,
                micro,
                no_sync=contextlib.nullcontext,
                autocast=contextlib.nullcontext(),
                family="clip",
            )
        grads.append((value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_one, one), (loss_accum, accumulated) = grads
    assert loss_accum == pytest.approx(loss_one, abs=1e-6)
    assert set(one) == set(accumulated)
    for name, grad in one.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_accumulation_follows_the_full_batch_run(shapes_world, tmp_path):
    runs = {}
    for accum in (1, 4):
        overrides = tiny_run_overrides(
            str(shapes_world / "train.csv"),
            steps=6,
            **{"model.vision": TINY_VIT, "train.batch_size": 32, "train.accum_steps": accum, "train.log_every": 1},
        )
        runs[accum] = tmp_path / f"accum{accum}"
        train(load_run_config(None, overrides), runs[accum])
    one, accumulated = _records(runs[1]), _records(runs[4])
    assert [r["step"] for r in accumulated] == list(range(1, 7))
    for a, b in zip(one, accumulated, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    weights = [load_checkpoint(run).model.state_dict() for run in runs.values()]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_accumulation_must_split_the_batch(shapes_world, tmp_path):
    from vlp.config import ConfigError

    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=1, **{"train.accum_steps": 5})
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(load_run_config(None, overrides), tmp_path / "run")


def _torchrun_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vlp", *args]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun_command(args), check=False, cwd=cwd, capture_output=True, text=True, timeout=600, env=_ENV
    )


def _write_config(path, overrides: list[str]):
    data: dict = {}
    apply_overrides(data, overrides)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_process_run(shapes_world, tmp_path_factory):
    """A 2-process run of 60 steps, checkpointing every 5: the reference for the torchrun tests."""
    root = tmp_path_factory.mktemp("torchrun")
    config = _write_config(
        root / "run.yaml",
        tiny_run_overrides(
            str(shapes_world / "train.csv"),
            steps=60,
            **{"train.batch_size": 32, "train.log_every": 5, "train.save_every": 5},
        ),
    )
    result = _torchrun(["train", "--config", str(config), "--out", str(root / "double")], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("last checkpoint:") == 1
    return config, root / "double"


def _assert_same_run(reference, other, rel: float, drift_after: int | None = None) -> None:
    """Same logged steps, the same losses within `rel` and every weight tensor within 10 x `rel` of its
    norm. Where reductions run in another order (1 vs 2 processes), float noise grows through tens of
    clipped Adam steps: after step `drift_after` losses are held to 10 x `rel` and weights to 50 x."""
    one, two = _records(reference), _records(other)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        tolerance = rel if drift_after is None or b["step"] <= drift_after else 10 * rel
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance), b["step"]
    weights = [load_checkpoint(run).model.state_dict() for run in (reference, other)]
    weights_rel = 10 * rel if drift_after is None else 50 * rel
    for name, value in weights[0].items():
        difference = (weights[1][name].float() - value.float()).norm() / value.float().norm().clamp_min(1e-6)
        assert difference < weights_rel, f"{name}: relative difference {difference:.2e}"


def test_two_process_torchrun_run_follows_the_one_process_run(two_process_run, tmp_path):
    """The same global batch on 2 gloo processes: the same batches, the same loss curve, the same weights."""
    config, double = two_process_run
    single = tmp_path / "single"
    train(load_run_config(config), single)
    assert all(r["samples_per_s"] > 0 for r in _records(double))
    assert _records(double)[-1]["loss"] < _records(double)[0]["loss"]
    _assert_same_run(single, double, rel=1e-3, drift_after=20)


def test_killed_two_process_run_resumes_where_it_stopped(two_process_run, tmp_path):
    config, reference = two_process_run
    run = tmp_path / "killed"
    args = ["train", "--config", str(config), "--out", str(run)]
    process = subprocess.Popen(
        _torchrun_command(args), cwd=tmp_path, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(run) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        # What a scheduler's cancel does: the launcher gets SIGTERM and takes both workers down mid-step.
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    killed_at = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert 0 < killed_at < 60, "the run was not killed before it finished"
    result = _torchrun([*args, "--resume", "latest"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stderr
    _assert_same_run(reference, run, rel=1e-4)


def test_fsdp_continues_a_ddp_run_with_its_optimizer_state(two_process_run, tmp_path):
    """Checkpoints hold whole weights and optimiser state keyed by name, whatever sharded them: a DDP run's
    step-55 checkpoint resumed with fully sharded parameters ends where the DDP run ended."""
    config, reference = two_process_run
    run = tmp_path / "fsdp"
    shutil.copytree(list_checkpoints(reference)[0], run / "checkpoints" / "step_00000055")
    args = ["train", "--config", str(config), "--out", str(run), "--resume", "latest", "--set", "train.strategy=fsdp"]
    result = _torchrun(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = _records(run)
    assert last["step"] == 60
    assert last["loss"] == pytest.approx(_records(reference)[-1]["loss"], rel=1e-4)
    resumed = load_checkpoint(run).model.state_dict()
    for name, value in load_checkpoint(reference).model.state_dict().items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_training_follows_eager_training(shapes_world, tmp_path):
    """`train.compile=true` (about a minute of compiling on 2 cores) trains the same as eager."""
    runs = {}
    for compiled in (False, True):
        overrides = tiny_run_overrides(
            str(shapes_world / "train.csv"),
            steps=6,
            **{"model.vision": TINY_VIT, "train.compile": compiled, "train.log_every": 1},
        )
        runs[compiled] = tmp_path / f"compile-{compiled}"
        train(load_run_config(None, overrides), runs[compiled])
    _assert_same_run(runs[False], runs[True], rel=1e-3)
