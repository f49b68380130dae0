"""The one config system of the recipe: every section is a dataclass deriving from `SectionConfig`.

The recipe itself (compress.recipe), its plain sections (model, solver, validate, export, bench,
report) and the transforms' configs (calibration, quantize, prune, slim) are all built by
`SectionConfig.from_dict`, the one place that checks a recipe mapping: an unknown key names the
closest valid one, a value of the wrong type or out of range names its dotted key, and both are a
`UserError` (one line, exit 2). ``to_dict()`` writes a configuration back as the recipe's mapping.

Checks beyond a field's type live in the dataclass itself (``__post_init__``), as the transforms'
``validate()`` methods do. A field may carry metadata: ``key`` (its name in the recipe, where that
is not a Python-friendly name), ``ge`` (the smallest valid number).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union

from compress.errors import UserError, did_you_mean

_MISSING = object()


class SectionConfig:
    section: ClassVar[str]  # the recipe key, for error messages
    # A section given as a plain string instead of a mapping sets this field ("model: zoo:digits").
    shorthand: ClassVar[str | None] = None

    @classmethod
    def from_dict(cls, values: dict | None, where: str | None = None, source: str = "recipe"):
        """Like ``cls(**values)``, but an unknown key, a missing one or a value of the wrong type is a
        one-line `UserError` that names the key (``where`` is its dotted prefix, ``source`` the file)."""
        if where is None:
            where = f"{cls.section}." if isinstance(getattr(cls, "section", None), str) else ""
        if cls.shorthand is not None and isinstance(values, str):
            values = {cls.shorthand: values}
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: {where.rstrip('.') or 'recipe'}: expected a mapping, got {_shown(values)}")
        fields = {_key(f): f for f in dataclasses.fields(cls) if f.init}
        for key in values:
            if key not in fields:
                hint = did_you_mean(key, fields, cutoff=0.5) or f" (valid: {', '.join(fields)})"
                raise UserError(f"{source}: unknown key '{where}{key}'{hint}")
        hints = _type_hints(cls)
        kwargs = {}
        for key, f in fields.items():
            if key not in values:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise UserError(f"{source}: {where}{key}: Field required")
                continue
            value = values[key]
            if f.name in hints:
                value = _convert(value, hints[f.name], f"{where}{key}", source)
            if "ge" in f.metadata and value is not None and value < f.metadata["ge"]:
                raise UserError(f"{source}: {where}{key}: must be >= {f.metadata['ge']}, got {_shown(value)}")
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a check in __post_init__ that compares values of the wrong type
            raise UserError(f"{source}: bad '{where.rstrip('.')}' section: {e}") from None

    def to_dict(self) -> dict:
        """The recipe section that reproduces this configuration."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[_key(f)] = value.to_dict() if isinstance(value, SectionConfig) else _plain(value)
        return out


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve at run time: those fields are not type-checked
        return {}


def _shown(value) -> str:
    return {dict: "a mapping", list: "a list"}.get(type(value), repr(value))


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, SectionConfig):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value, tp, where: str, source: str):
    """``value`` checked against the annotation ``tp`` (numbers widened to float where a float is asked for)."""
    converted = _try(value, tp, where, source)
    if converted is _MISSING:
        raise UserError(f"{source}: {where}: expected {_describe(tp)}, got {_shown(value)}")
    return converted


def _try(value, tp, where: str, source: str):
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _MISSING
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _try(value, options[0], where, source)
        for option in options:
            try:
                converted = _try(value, option, where, source)
            except UserError:
                continue
            if converted is not _MISSING:
                return converted
        return _MISSING
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise UserError(f"{source}: {where}: expected {_describe(tp)}, got {_shown(value)}{did_you_mean(value, args)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _MISSING
        return [_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        return dict(value) if isinstance(value, dict) else _MISSING
    if isinstance(tp, type) and issubclass(tp, SectionConfig):
        return _MISSING if value is None else tp.from_dict(value, f"{where}.", source)
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    return value  # an annotation this checker does not know: the dataclass's own checks decide
