"""Strict parsing of a config into typed dataclasses: YAML 1.2 text, ``--set dotted.key=value``
overrides, and nested updates that check every key and value type. :class:`ConfigError` is what
every config problem raises (kl_ae.config validates the values, kl_ae.model the files a config
names); its message names the key and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so ``mixed_precision: no`` stays "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key and what to do."""


def check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to the annotated type ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # every range check would pass a NaN
                raise ConfigError(f"config key {key!r} expects a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {value!r}")


def apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from a nested dict, checking names and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            apply(current, value, key + ".")
        else:
            setattr(obj, name, check_type(value, hints[name], key))


def parse_override(item: str) -> dict:
    """``'train.max_steps=20'`` -> ``{'train': {'max_steps': 20}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set has an empty key part in {item!r}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        if raw.strip().startswith("*"):  # "*.png": YAML reads an alias; a glob is what was meant
            value = raw.strip()
        else:
            why = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"--set {key.strip()}: {raw!r} is not a YAML value ({why}); quote it or fix "
                              "the brackets") from None
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested
