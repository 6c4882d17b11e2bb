"""Typed-dataclass loading and the checks every params section uses; a leaf module.

`from_dict(cls, data, where)` builds a dataclass from a mapping, rejecting unknown keys (with a
"did you mean") and wrong types, then calls the dataclass's `validate(where)`. `require` and
`positive` are what those `validate` methods are written with; every message names the dotted
key. It imports nothing from the package but errors, so the GAN families (their Config
dataclasses) and pipeline.config both use it without importing each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pipeline.errors import ParamsError


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (converting ints to floats, lists to tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ParamsError(f"params key '{key}' is {value!r}; allowed values: "
                              f"{', '.join(map(repr, allowed))}.{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params key '{key}' must be a list, got {value!r}.")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params key '{key}' must be a mapping, got {value!r}.")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params key '{key}' must be an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params key '{key}' must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params key '{key}' must be a string, got {value!r}.")
        return value
    return value


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types.

    `where` is the dotted path of this section, used in every message. A class attribute
    `RENAMED = {old key: new key}` turns an old key into an error naming its new name.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"params section '{where or 'top level'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    renamed = getattr(cls, "RENAMED", {})   # old key -> new key, for keys a release renamed
    for key in unknown:
        if key in renamed:
            raise ParamsError(f"params key '{_join(where, key)}' was renamed to '{_join(where, renamed[key])}'; "
                              f"rename it in your params file.")
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
        section = f"'{where}'" if where else "the top level"
        raise ParamsError(f"unknown params key '{_join(where, key)}'.{hint} "
                          f"Known keys in {section}: {', '.join(sorted(fields))}.")
    kwargs = {name: _coerce(value, hints[name], _join(where, name)) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params dataclass (for logging, checkpoints, manifests)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params, DVC-style keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def require(cond: bool, key: str, message: str) -> None:
    """Raise a ParamsError naming `key` unless `cond` holds."""
    if not cond:
        raise ParamsError(f"params key '{key}' {message}")


def positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value > 0, f"{where}.{name}",
                f"must be greater than 0, got {value!r}.")
