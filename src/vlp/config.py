"""Typed configs: dataclasses built from YAML/JSON files with dotted command-line overrides.

Every key is checked against the dataclass before any work starts: an unknown key or a value of
the wrong type raises `ConfigError` naming the dotted key, so a typo never falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from vlp.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric config value, checked when a config is read: `Annotated[int, Range(min=1)]`."""

    min: float | None = None
    max: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False

    def check(self, value: Any, key: str) -> None:
        if value is None:
            return
        too_low = self.min is not None and (value <= self.min if self.exclusive_min else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.exclusive_max else value > self.max)
        if too_low or too_high:
            bounds = []
            if self.min is not None:
                bounds.append(f"{'>' if self.exclusive_min else '>='} {self.min:g}")
            if self.max is not None:
                bounds.append(f"{'<' if self.exclusive_max else '<='} {self.max:g}")
            raise ConfigError(f"{_where(key)}: {value!r} is out of range (must be {' and '.join(bounds)})")


# The ranges most config values need.
PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(min=0, exclusive_min=True)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Fraction = Annotated[float, Range(min=0, max=1)]


def _where(key: str) -> str:
    """How an error names a value: a config key by its dotted name, a command-line flag as itself."""
    return key if key.startswith("-") else f"config key '{key}'"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _kind(cls: Any) -> str | None:
    field = next((f for f in dataclasses.fields(cls) if f.name == "kind"), None)
    return field.default if field is not None and isinstance(field.default, str) else None


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *metadata = get_args(tp)
        value = _convert(value, base, key)
        for item in metadata:
            if isinstance(item, Range):
                item.check(value, key)
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{_where(key)}: null is not allowed, expected {_type_name(tp)}")
        tagged = {_kind(o): o for o in options if dataclasses.is_dataclass(o) and _kind(o) is not None}
        if tagged and isinstance(value, dict):
            # A union of configs is told apart by its `kind` key, defaulting to the first option.
            kind = value.get("kind", next(iter(tagged)))
            if kind not in tagged:
                raise ConfigError(f"{_where(key + '.kind')}: {kind!r} is not one of {', '.join(map(repr, tagged))}")
            return from_dict(tagged[kind], value, prefix=key)
        candidates = [o for o in options if o is not type(None)]
        if len(candidates) == 1:  # an optional value: its own error (type or range) is the clearest
            return _convert(value, candidates[0], key)
        for option in candidates:
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{_where(key)}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{_where(key)}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key)}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key)}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(key)}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key)}: expected a mapping, got {value!r}")
        args = get_args(tp)
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(key)}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("5e-4") as strings.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(key)}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{_where(key)}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_where(key)}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{_where(key)}: expected {_type_name(tp)}, got {value!r}")


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against type `tp` (ranges included) and converted; an error names `key` (a dotted
    config key, or a flag such as `--k`)."""
    return _convert(value, tp, key)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted name."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing config key '{where}{missing[0]}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config section '{prefix or cls.__name__}': {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON-ready mapping of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Load `cls` from a file (optional) plus dotted overrides."""
    data = read_mapping(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(cls, data)
