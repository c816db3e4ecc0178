"""Config text to typed settings: plain YAML (no tags that build objects, no aliases) read into
the config's dataclasses, each value checked against its field's type, so a typo or a wrong
type is one line naming the key (``pipeline.config`` holds the settings themselves)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; a bigger file is not one


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): a config needs none, and nested aliases
    expand exponentially when the config is copied (a 554-byte "alias bomb" ran for minutes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """Plain YAML data (no tags that build objects, no aliases), or one line naming ``where``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{where}: not valid config YAML: {problem}{at}") from None


def config_text(path: Path) -> str:
    """The config file's text, or one line: a missing file, a folder, a file too large to be one."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; --config takes a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes is too large for a config file")
    return path.read_text()


def build_settings(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '(root)'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = build_settings(hints[name], value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, known[name], hints[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, spec: dataclasses.Field, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type; ints may be given for floats."""
    # e.g. ``int | Literal["all"]``: the first arm that takes it
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, spec, arm, key)
            except ValueError:
                pass
        raise ValueError(f"{key} must be {' or '.join(map(_described, typing.get_args(hint)))}, got {value!r}")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc, operator]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        number = _float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    elif isinstance(value, type(default)):
        return value
    raise ValueError(f"{key} must be of type {type(default).__name__}, got {value!r}")


def _float(value: Any) -> float | None:
    """``value`` as a float, or ``None``; YAML 1.1 reads "3e-4" (no dot) as a string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _described(hint: Any) -> str:
    """``an int`` or ``'all'``: a union arm as an error message names it."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return f"an {hint.__name__}" if hint.__name__[0] in "aeiou" else f"a {hint.__name__}"
