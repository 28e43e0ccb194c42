"""Command-line flags generated from config dataclasses: each field becomes a flag (or a positional argument)
with the field's type, choices and default, and a value given is checked as a config value is (type and
range, from the dataclass), so no command restates a config by hand. An error names the flag.

A field says how it appears with `option(...)`: its help, another flag name (`--beams` for `num_beams`),
or that it is positional. A field whose type is a config dataclass (a generation config, say) gives
its own fields as flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from vlp.config import convert_value
from vlp.errors import ConfigError

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    flag: str | None = None,
    positional: bool = False,
    repeat: bool = False,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    image: bool = False,
) -> Any:
    """A dataclass field with what its flag needs: help text, a flag name other than `--field-name`, or a
    positional argument. A list field takes one or more values after its flag, or with `repeat` one value
    per use of the flag (`--task a --task b`). `image`: the field holds images (a file name on the command
    line; the bytes themselves in a request to the service)."""
    metadata = {"help": help, "flag": flag, "positional": positional, "repeat": repeat, "metavar": metavar,
                "image": image}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base(tp: Any) -> Any:
    """The type a flag's text converts to: without Annotated ranges and without Optional."""
    if get_origin(tp) is Annotated:
        return _base(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if len(options) == 1:
            return _base(options[0])
    return tp


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type) of every flag of `cls`, a nested config's fields in its place."""
    hints = get_type_hints(cls, include_extras=True)
    out = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        if dataclasses.is_dataclass(_base(tp)):
            out += _fields(_base(tp), f"{prefix}{field.name}.")
        else:
            out.append((f"{prefix}{field.name}", field, tp))
    return out


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag (or positional argument) on `parser` for every field of config dataclass `cls`."""
    for dotted, field, tp in _fields(cls):
        base = _base(tp)
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", "")}
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        origin = get_origin(base)
        if origin in (list, tuple):
            if field.metadata.get("repeat"):
                kwargs["action"] = "append"
            else:
                kwargs["nargs"] = "+"
            base = _base(get_args(base)[0]) if get_args(base) else str
        if get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
            kwargs["type"] = type(get_args(base)[0])
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base in (int, float, str):
            kwargs["type"] = base
        elif base is Path:
            kwargs["type"] = str
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no flag for a {base!r}")
        if any(action.dest == dotted for action in parser._actions):
            raise TypeError(f"{cls.__name__}.{field.name}: the command already has an argument {dotted!r}")
        if field.metadata.get("positional"):
            parser.add_argument(dotted, **kwargs)
            continue
        if "choices" not in kwargs and base is not bool:
            kwargs.setdefault("metavar", field.name.upper())  # the field's name, not its dotted path
        if _has_default(field):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if default not in (None, "", (), []) and base is not bool:
                kwargs["help"] += f" (default: {default})"
            kwargs["default"] = argparse.SUPPRESS  # left out: the dataclass's default applies
        else:
            kwargs["required"] = True
        parser.add_argument(_flag_name(field), dest=dotted, **kwargs)


def parse_flags(cls: type[T], args: argparse.Namespace) -> T:
    """The config `cls` from the flags `add_flags` made: every value given is checked (type, range) and an
    error names its flag; values not given take the dataclass's defaults."""
    return _build(cls, vars(args), "")


def _utf8(value: Any, name: str) -> Any:
    """The value, refused when the command line held bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which no tokenizer takes)."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                raise ConfigError(f"{name}: {shown!r} is not UTF-8 text") from None
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    hints = get_type_hints(cls, include_extras=True)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        dotted, tp = f"{prefix}{field.name}", hints[field.name]
        if dataclasses.is_dataclass(_base(tp)):
            if any(key.startswith(dotted + ".") for key in values):
                kwargs[field.name] = _build(_base(tp), values, dotted + ".")
        elif dotted in values:
            name = dotted if field.metadata.get("positional") else _flag_name(field)
            kwargs[field.name] = convert_value(_utf8(values[dotted], name), tp, name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{' '.join(str(err).split())}") from err
