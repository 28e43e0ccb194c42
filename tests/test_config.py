from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from vlp.config import (
    ConfigError,
    Fraction,
    PositiveFloat,
    PositiveInt,
    Range,
    apply_overrides,
    from_dict,
    load_config,
)
from vlp.train.config import load_run_config


@dataclass
class Inner:
    width: int = 8
    act: Literal["gelu", "quick_gelu"] = "gelu"
    scale: tuple[float, float] = (0.5, 1.0)


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    bias: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_typed_config():
    cfg = from_dict(Outer, {"lr": 1, "bias": -10, "inner": {"width": 16, "act": "quick_gelu", "scale": [0.1, 1]}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.bias == -10.0
    assert cfg.inner == Inner(width=16, act="quick_gelu", scale=(0.1, 1.0))


@pytest.mark.parametrize("data, message", [
    ({"inner": {"widht": 3}}, "unknown config key 'inner.widht'"),
    ({"inner": {"width": "wide"}}, "'inner.width': expected an integer"),
    ({"inner": {"width": True}}, "'inner.width': expected an integer"),
    ({"inner": {"act": "relu"}}, "'inner.act': 'relu' is not one of"),
    ({"lr": "fast"}, "'lr'"),
    ({"inner": {"scale": [1]}}, "'inner.scale': expected 2 values"),
])
def test_wrong_keys_and_types_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(Outer, data)


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ninner:\n  width: 4\n")
    cfg = load_config(Outer, path, ["inner.width=32", "lr=5e-4", "bias=null", "name=run 1"])
    assert (cfg.inner.width, cfg.lr, cfg.bias, cfg.name) == (32, 5e-4, None, "run 1")
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["inner.width"])


def test_run_config_checks_family_sections_before_any_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  family: clip\n  vision:\n    layerz: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.vision.layerz'"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="unknown family 'clop'"):
        load_run_config(path, ["model.family=clop"])
    with pytest.raises(ConfigError, match="'objective.loss'"):
        load_run_config(None, ["model.family=clip", "objective.loss=hinge"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for name in ("clip-tiny", "siglip-tiny"):
        cfg = load_run_config(f"configs/{name}.yaml")
        family, _model_cfg, objective_cfg = cfg.family_configs()
        assert family.name == "clip"
        assert objective_cfg.loss == name.split("-")[0]


@dataclass
class Bounded:
    steps: PositiveInt = 1
    share: Fraction = 0.5
    clip: PositiveFloat | None = None
    pair: tuple[Annotated[float, Range(min=0, max=1, exclusive_max=True)], float] = (0.5, 2.0)


@pytest.mark.parametrize(("data", "message"), [
    ({"steps": 0}, "'steps': 0 is out of range (must be >= 1)"),
    ({"share": 1.5}, "'share': 1.5 is out of range (must be >= 0 and <= 1)"),
    ({"clip": 0}, "'clip': 0.0 is out of range (must be > 0)"),
    ({"clip": "big"}, "'clip': expected a number, got 'big'"),
    ({"pair": [1.0, 3]}, "'pair[0]': 1.0 is out of range (must be >= 0 and < 1)"),
])
def test_ranges_are_checked_when_a_config_is_read(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Bounded, data, prefix="x")
    assert str(error.value) == f"config key 'x.{message[1:]}"
    assert from_dict(Bounded, {"clip": None, "steps": 3}).steps == 3
