"""Recipe configuration: dataclass schemas filled from YAML files and ``--set key=value`` overrides.

A schema is any dataclass (nested dataclasses become nested YAML sections). Values are merged in the
order *schema defaults < base < YAML file < overrides*, type-checked against the annotations, and
unknown or mistyped keys are rejected with the file, the dotted key and the nearest valid key::

    cfg = load_config(SailRecipe, "recipe.yaml", ["train.lr=3e-4", "train.steps=200"])
    save_config(cfg, out_dir / "config.yaml")          # the resolved recipe, loadable again

Supported annotations: ``int``, ``float`` (ints and float-like strings such as PyYAML's ``1e-5``
accepted), ``str``, ``bool``, ``pathlib.Path``, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
``dict[str, T]``, ``Optional``/unions, ``Literal[...]``, ``Any`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from align.errors import UserError
from align.io import atomic_path, read_text

T = TypeVar("T")

__all__ = [
    "RESUMED_KEY",
    "ConfigError",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]


RESUMED_KEY = "resumed"  # the record of a resumed run in its config.yaml (see save_config)


class ConfigError(UserError):
    """A recipe value or key that does not fit its schema; the message names source and key.

    ``key`` is the schema-local key a ``__post_init__`` check rejected, so that the error can name the
    ``--set`` override (or the file) it came from.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ----------------------------------------------------------------------------- helpers


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fields(schema: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(schema)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(schema) if f.init}


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (_, tp) in _fields(schema).items():
        keys.append(prefix + name)
        for inner in _union_members(tp):
            if _is_dataclass_type(inner):
                keys.extend(_all_keys(inner, prefix + name + "."))
    return keys


def _union_members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _similarity(typed: str, candidate: str) -> float:
    """Character similarity plus overlap of ``_``-separated words (``lr_rate`` is nearer ``lr``)."""
    chars = difflib.SequenceMatcher(None, typed, candidate).ratio()
    a, b = set(typed.split("_")), set(candidate.split("_"))
    return chars + len(a & b) / len(a | b)


def _suggest(key: str, schema: type, prefix: str) -> str:
    """``"; did you mean 'x'?"`` for the nearest valid key, or an empty string."""
    local = key[len(prefix) :]
    scored = [(_similarity(local, name), name) for name in _fields(schema)]
    best = max(scored, default=(0.0, ""))
    if best[0] >= 0.6:
        return f"; did you mean '{prefix + best[1]}'?"
    # A key put in the wrong section: match its name against the names in every section.
    nested = [(_similarity(local, k.rsplit(".", 1)[-1]), k) for k in _all_keys(schema, prefix) if "." in k]
    best = max(nested, default=(0.0, ""))
    return f"; did you mean '{best[1]}'?" if best[0] >= 0.9 else ""


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, source: str, origins: Mapping[str, str] = {}) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (tuples, Paths, dataclasses)."""
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, source, key + ".", origins)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        # Prefer an exact type match so that e.g. ``int | float`` keeps ints as ints.
        ordered = sorted(args, key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        for member in ordered:
            try:
                return _coerce(value, member, key, source, origins)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        vtype = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vtype, f"{key}.{k}", source) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise ConfigError(f"{source}: key '{key}' has an unsupported annotation {tp!r} in the schema")


def _source_of(key: str, source: str, origins: Mapping[str, str]) -> str:
    """Where ``key`` was set: the ``--set`` override for it (or a parent section), else ``source``."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        label = origins.get(".".join(parts[:n]))
        if label is not None:
            return label
    return source


def _build(
    schema: type[T], values: Mapping[str, Any], source: str, prefix: str = "", origins: Mapping[str, str] = {}
) -> T:
    fields = _fields(schema)
    for key in values:
        if key not in fields:
            full = prefix + str(key)
            where = _source_of(full, source, origins)
            raise ConfigError(f"{where}: unknown key '{full}'{_suggest(full, schema, prefix)}")
    kwargs = {}
    for name, (field, tp) in fields.items():
        full = prefix + name
        if name not in values:
            no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if no_default:
                raise ConfigError(f"{source}: missing required key '{full}' ({_type_name(tp)})")
            continue
        value = values[name]
        try:
            kwargs[name] = _coerce(value, tp, full, source, origins)
        except _Mismatch:
            raise ConfigError(
                f"{_source_of(full, source, origins)}: key '{full}' expects {_type_name(tp)}, found {type(value).__name__} {value!r}"
            ) from None
    try:
        return schema(**kwargs)
    except ConfigError as err:
        origin = _source_of(prefix + err.key, source, origins) if err.key else source
        where = f" (section '{prefix[:-1]}')" if prefix and origin == source else ""
        raise ConfigError(f"{origin}{where}: {err}") from None


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able data for a config dataclass (tuples become lists, Paths strings)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Split ``key=value`` strings; values are parsed with ``yaml.safe_load`` (numbers, bools, lists)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from None
        parsed.append((key, value))
    return parsed


def _set_dotted(tree: dict, schema: type, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node, current = tree, schema
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        prefix = prefix + "." if prefix else ""
        last = depth == len(parts) - 1
        fields = _fields(current) if current is not None else None
        if fields is not None and part not in fields:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(prefix + part, current, prefix)}")
        if last:
            node[part] = value
            return
        tp = fields[part][1] if fields is not None else Any
        inner = next((m for m in _union_members(tp) if _is_dataclass_type(m)), None)
        is_mapping = inner is not None or typing.get_origin(tp) is dict or tp in (dict, Any)
        if not is_mapping:
            raise ConfigError(f"{source}: key '{prefix + part}' is a {_type_name(tp)}, not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = config_to_dict(child) if child is not None else {}
            node[part] = child
        node, current = child, inner


def _merge(dst: dict, src: Mapping) -> dict:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = config_to_dict(value)
    return dst


def load_config(
    schema: type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: T | Mapping[str, Any] | None = None,
) -> T:
    """Build a ``schema`` instance from defaults, ``base``, the YAML file at ``path`` and overrides.

    ``overrides`` are ``"dotted.key=value"`` strings (the CLI's ``--set``). Raises ``ConfigError``
    naming the file (or ``--set``) and the dotted key for unknown keys (with the nearest valid key),
    mistyped values and missing required keys; ``FileNotFoundError`` when ``path`` does not exist.
    """
    if not _is_dataclass_type(schema):
        raise TypeError(f"load_config: schema must be a dataclass type, got {schema!r}")
    tree: dict[str, Any] = {}
    if base is not None:
        _merge(tree, config_to_dict(base))
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        source = str(path)
        try:
            data = yaml.safe_load(read_text(path))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}"
            )
        data = {k: v for k, v in data.items() if k != RESUMED_KEY}  # a run's record, not a setting
        # Validate the file's own keys before overrides so errors name the file.
        _build_keys_only(schema, data, source)
        _merge(tree, data)
    origins: dict[str, str] = {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, schema, key, value, f"--set {key}")
        origins[key] = f"--set {key}"
    return _build(schema, tree, source, origins=origins)


def _build_keys_only(schema: type, data: Mapping, source: str, prefix: str = "") -> None:
    fields = _fields(schema)
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{full}'{_suggest(full, schema, prefix)}")
        inner = next((m for m in _union_members(fields[key][1]) if _is_dataclass_type(m)), None)
        if inner is not None and isinstance(value, Mapping):
            _build_keys_only(inner, value, source, full + ".")


def save_config(cfg: Any, path: str | os.PathLike, resumed: list[dict[str, Any]] | None = None) -> None:
    """Write the resolved config as YAML, atomically; ``load_config`` reads it back to an equal object.

    ``resumed``: a training run's record of its resumes (a top-level ``resumed`` list that
    ``load_config`` skips): for each, the checkpoint and the requested settings it ignored.
    """
    tree = config_to_dict(cfg)
    if resumed:
        tree[RESUMED_KEY] = resumed
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
