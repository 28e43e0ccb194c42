"""`precision: auto` computes in bf16 only where the hardware has bf16 arithmetic: on a CPU that emulates it
(AVX2 only) a bf16 training step was measured 7.5x slower than fp32."""

import logging

import pytest
import torch

from conftest import tiny_run_overrides
from vlp import precision
from vlp.precision import resolve_precision
from vlp.registry import create_model
from vlp.tasks.embedding import EmbeddingPredictor
from vlp.train.config import load_run_config
from vlp.train.loop import train


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Makes this CPU count as having bf16 arithmetic or not."""

    def pretend(native: bool) -> None:
        monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: native)

    return pretend


@pytest.fixture
def fresh_capabilities():
    precision._cpu_has_bf16.cache_clear()
    yield
    precision._cpu_has_bf16.cache_clear()


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_with_bf16_arithmetic(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize(("capabilities", "native"), [
    ({"avx2": True, "avx512_f": True, "avx512_bf16": False}, False),  # AVX-512 alone converts, not computes
    ({"avx2": True, "avx512_bf16": True}, True),
    ({"amx_bf16": True}, True),
    ({"neon": True, "bf16": True}, True),  # Arm
    ({}, False),
])  # fmt: skip
def test_the_cpu_check_reads_torch_cpu_capabilities(monkeypatch, fresh_capabilities, capabilities, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert precision.has_native_bf16("cpu") is native


def test_bf16_asked_for_where_it_is_emulated_is_kept_with_one_warning(cpu_bf16, caplog):
    cpu_bf16(False)
    precision._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="vlp.precision"):
        assert resolve_precision("bf16", "cpu") == "bf16"
        assert resolve_precision("bf16", "cpu") == "bf16"
        assert resolve_precision("bf16", "mps") == "bf16"  # whether MPS computes bf16 natively is not known here
    assert sum("emulated" in r.getMessage() for r in caplog.records) == 1
    cpu_bf16(True)
    caplog.clear()
    precision._warn_emulated.cache_clear()
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert not caplog.records


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_training_defaults_to_auto_and_says_what_it_computes_in(shapes_world, tmp_path, cpu_bf16, caplog, native,
                                                                expected):
    cpu_bf16(native)
    overrides = [o for o in tiny_run_overrides(str(shapes_world / "train.csv"), steps=2)
                 if not o.startswith("train.precision")]
    cfg = load_run_config(None, overrides)
    assert cfg.train.precision == "auto"
    with caplog.at_level(logging.INFO, logger="vlp.train"):
        run = train(cfg, tmp_path / "run")
    assert f"computing in {expected} on cpu (train.precision: auto)" in caplog.text
    # A predictor's auto follows the same rule.
    texts = ["a red circle", "a small blue square"]
    auto = EmbeddingPredictor.from_checkpoint(run, precision="auto").embed_texts(texts)
    same = EmbeddingPredictor.from_checkpoint(run, precision=expected).embed_texts(texts)
    assert torch.equal(auto, same)


@pytest.mark.parametrize(("native", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_blip2_frozen_parts_follow_auto(cpu_bf16, native, dtype):
    cpu_bf16(native)
    model = create_model("blip2-tiny", lm_precision="auto")
    assert model.image_encoder.cfg.vision_precision == "auto"
    assert next(model.image_encoder.visual.parameters()).dtype == dtype
    assert next(model.language_model.parameters()).dtype == dtype
    assert model.image_encoder(torch.rand(1, 3, 32, 32)).dtype == torch.float32

