"""The one way configs are built: plain dicts (read from YAML or JSON) -> (nested) dataclasses.

Used by the model config (:meth:`refdecoder.RefDecoderConfig.from_dict`), the training config and the benchmark
settings. Every value must fit its field's annotation, and every required field must be given; otherwise a
:class:`~refdecoder.errors.ConfigError` names the dotted key (``optim.lr``), what was expected and what was given.
An unknown key is an error with a "did you mean" hint, or, for files written by another version of the library
(saved model configs), a logged warning. :func:`yaml_load` reads ``1e-4`` as a number, as YAML 1.2 does, and
rejects a key given twice.
Supported annotations: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``Literal[...]``, unions (incl.
``X | None``), ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``, ``Any`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from refdecoder._deps import require
from refdecoder.errors import ConfigError

__all__ = ["UnknownKeys", "build_dataclass", "coerce", "describe_type", "to_plain", "yaml_load"]

logger = logging.getLogger("refdecoder")

UnknownKeys = Literal["error", "warn"]


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "", unknown: UnknownKeys = "error") -> Any:
    """Build ``cls`` from ``data``; wrong types and missing required keys raise :class:`ConfigError` naming the key.

    Args:
        cls: a dataclass type; absent fields keep their defaults.
        data: the values, possibly nested mappings for nested dataclasses.
        prefix: dotted path of ``data`` inside the whole config, for messages (``"optim."``).
        unknown: ``"error"``: an unknown key raises (with the closest valid key); ``"warn"``: it is logged and
            ignored, for files written by another version (a saved ``refdecoder_config.json``).
    """
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    strange = [str(key) for key in data if key not in fields]
    if strange and unknown == "error":
        raise ConfigError(_unknown_key_message(prefix, strange[0], sorted(fields)))
    if strange:
        logger.warning("ignoring unknown config keys %s", [prefix + key for key in strange])
    missing = [name for name, f in fields.items() if name not in data and _is_required(f)]
    if missing:
        raise ConfigError(f"missing config key {prefix + missing[0]!r} (required keys: {', '.join(missing)})")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: coerce(hints[name], value, prefix + name, unknown) for name, value in data.items() if name in fields
    }
    return cls(**kwargs)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _unknown_key_message(prefix: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    where = prefix.rstrip(".") or "the top level"
    return f"unknown config key {prefix + key!r}{hint} (valid keys under {where}: {', '.join(valid)})"


def coerce(tp: Any, value: Any, key: str, unknown: UnknownKeys = "error") -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers (lists -> tuples where declared)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            return _fail(tp, value, key)
        return build_dataclass(tp, value, key + ".", unknown)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, args, value, key, unknown)
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _fail(tp, value, key)
    if origin in (tuple, list):
        return _coerce_sequence(tp, origin, args, value, key, unknown)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return _fail(tp, value, key)
        return {k: coerce(args[1], v, f"{key}.{k}", unknown) for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_union(tp: Any, args: tuple[Any, ...], value: Any, key: str, unknown: UnknownKeys) -> Any:
    if value is None:
        return None if type(None) in args else _fail(tp, value, key)
    for option in (a for a in args if a is not type(None)):
        try:
            return coerce(option, value, key, unknown)
        except ConfigError as err:
            # A nested dataclass matched by shape but had a bad entry inside: that message is the useful one.
            if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                raise err
    return _fail(tp, value, key)


def _coerce_sequence(tp: Any, origin: type, args: tuple[Any, ...], value: Any, key: str, unknown: UnknownKeys) -> Any:
    if not isinstance(value, (list, tuple)):
        return _fail(tp, value, key)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            return _fail(tp, value, key)
        return tuple(coerce(a, v, f"{key}.{i}", unknown) for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [coerce(item, v, f"{key}.{i}", unknown) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        return value if isinstance(value, bool) else _fail(tp, value, key)
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _fail(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _fail(tp, value, key)
    if tp is str:
        return value if isinstance(value, str) else _fail(tp, value, key)
    raise ConfigError(f"config key {key!r} has an annotation this loader does not support: {tp!r}")


def _fail(tp: Any, value: Any, key: str) -> Any:
    raise ConfigError(f"config key {key!r} must be {describe_type(tp)}, got {value!r} ({type(value).__name__})")


def describe_type(tp: Any) -> str:
    """Readable form of an annotation, e.g. ``"float or null"`` or ``"one of 'ddp', 'fsdp'"``."""
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} values [{', '.join(describe_type(a) for a in args)}]"
    if origin in (tuple, list):
        return f"a list of {describe_type(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, repr(tp))


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists of plain values (YAML- and JSON-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def yaml_load(text: str) -> Any:
    """Parse YAML text; unlike plain PyYAML, ``1e-4`` is a float (YAML 1.2), not the string ``"1e-4"``, and a key
    given twice in one mapping is a :class:`ConfigError` naming its dotted path, not silently the last value."""
    yaml = require("yaml", extra="train", package="pyyaml")

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    _reject_repeated_keys(yaml.compose(text, Loader=_Loader), "")
    return yaml.load(text, Loader=_Loader)


def _reject_repeated_keys(node: Any, prefix: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a config naming a key twice is an error instead."""
    if hasattr(node, "value") and isinstance(node.value, list):
        is_mapping = type(node).__name__ == "MappingNode"
        seen: set[str] = set()
        for index, item in enumerate(node.value):
            key, child = (str(item[0].value), item[1]) if is_mapping else (str(index), item)
            if is_mapping and key in seen:
                line = item[0].start_mark.line + 1
                raise ConfigError(f"config key {prefix + key!r} is given twice (again on line {line}); keep one")
            seen.add(key)
            _reject_repeated_keys(child, f"{prefix}{key}.")
