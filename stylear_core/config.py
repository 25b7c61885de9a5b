"""Typed job configs: dataclasses with a help string per field, loaded from YAML, overridable on the CLI.

A config class is a (nested) dataclass whose fields are declared with :func:`option`::

    @dataclass
    class TrainConfig:
        lr: float = option(1e-4, "peak learning rate")
        zero_stage: int = option(2, "DeepSpeed ZeRO stage", choices=(2, 3))

:func:`load_config` reads a YAML file into it and applies ``key=value`` overrides
(``optim.lr=3e-4``, values parsed as YAML). Unknown keys and values of the wrong type are
:class:`ConfigError` s that name the dotted key, so a misspelt YAML key never passes silently.

A key that moved keeps working: a config class lists ``RENAMED_KEYS = {"old.dotted.key": "new.key"}``
(or ``"old": ("new", convert)`` when the value changes shape), and the old key is read as the new one.
Giving both is an error. :class:`Resources` is the one spelling of what a Ray task, actor or worker
reserves.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match its dataclass; the message names the key."""


def option(
    default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[Any] | None = None
) -> Any:
    """A dataclass field with a help string (and optional allowed values). Mutable defaults are copied."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata=meta)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting ints to floats), or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        vt = args[1] if args else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _pop_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any, dict[str, Any]]:
    """``(found, value, data without it)``; the mappings on the path are copied, never changed."""
    head, _, rest = dotted.partition(".")
    if head not in data:
        return False, None, data
    out = dict(data)
    if not rest:
        return True, out.pop(head), out
    if not isinstance(data[head], dict):
        return False, None, data
    found, value, out[head] = _pop_dotted(data[head], rest)
    if not out[head]:
        del out[head]  # a block left empty means its defaults, as when it is absent
    return (True, value, out) if found else (False, None, data)


def _with_dotted(data: dict[str, Any], dotted: str, value: Any, key: str, new_key: str) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``dotted``; :class:`ConfigError` when it is already set."""
    head, _, rest = dotted.partition(".")
    out = dict(data)
    if not rest:
        if head in out:
            raise ConfigError(f"{key} is the old name of {new_key}: give only one of them")
        out[head] = value
        return out
    child = out.get(head, {})
    if not isinstance(child, dict):
        raise ConfigError(f"{key}: cannot move it to {new_key}, {head} is not a mapping here")
    out[head] = _with_dotted(child, rest, value, key, new_key)
    return out


def _apply_renamed_keys(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``data`` with the old keys ``cls.RENAMED_KEYS`` lists moved to their new place (and shape)."""
    renamed: dict[str, str | tuple[str, Callable[[Any, str], Any]]] = getattr(cls, "RENAMED_KEYS", {})
    seeded: set[str] = set()
    for old, target in renamed.items():
        new, convert = (target, None) if isinstance(target, str) else target
        found, value, data = _pop_dotted(data, old)
        if not found:
            continue
        key = prefix + old
        head, _, rest = new.partition(".")
        if rest and head not in data:
            # The old key set one value of a block: the block's other values keep the field's default.
            data = {**data, head: _field_default_mapping(cls, head)}
            seeded.add(head)
        if head in seeded:
            data = {**data, head: {**data[head], rest: convert(value, key) if convert else value}}
        else:
            data = _with_dotted(data, new, convert(value, key) if convert else value, key, prefix + new)
    return data


def _field_default_mapping(cls: type, name: str) -> dict[str, Any]:
    """The default of the dataclass-valued field ``name`` of ``cls`` as a mapping of its fields."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not dataclasses.is_dataclass(default):
        return {}
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default)}


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    data = _apply_renamed_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} in {cls.__name__} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        converted = _convert(value, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices is not None and converted not in choices:
            raise ConfigError(f"{key}: expected one of {choices}, got {converted!r}")
        kwargs[name] = converted
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {prefix}{missing[0]} in {cls.__name__}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a mapping")
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a plain mapping, with the same checks as :func:`load_config`."""
    return _from_dict(cls, dict(data))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from the YAML at ``path`` (or its defaults), then apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return _from_dict(cls, data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-serialisable data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field, ``key (type, default): help``, for ``--help`` output."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        lines.append(
            f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}"
        )
    for old, target in getattr(cls, "RENAMED_KEYS", {}).items():
        new = target if isinstance(target, str) else target[0]
        lines.append(f"  {prefix}{old}: old name of {prefix}{new}, still read")
    return lines


def bool_to_count(value: Any, key: str) -> float:
    """An old on/off key read as a count (``true`` -> 1.0, ``false`` -> 0.0); as a ``RENAMED_KEYS`` converter."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    return 1.0 if value else 0.0


@dataclasses.dataclass
class Resources:
    """What one Ray task, actor or training worker reserves: CPUs and GPUs (a fraction shares a GPU)."""

    cpus: float = option(1.0, "CPUs reserved")
    gpus: float = option(0.0, "GPUs reserved (0 on CPU; a fraction shares one GPU)")

    def validate(self) -> None:
        """Neither count may be negative."""
        for name in ("cpus", "gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def ray_options(self) -> dict[str, float]:
        """The ``num_cpus`` / ``num_gpus`` options of ``ray.remote(...).options`` and ``map_batches``."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def parse_job_args(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    """The standard job CLI: ``--config FILE`` then any number of ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="config keys:\n" + "\n".join(describe(cls)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config (see jobs/configs/<stage>/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)
