"""Option dataclasses described by their fields: each field's metadata is the one source of its default,
range or choices, help text and CLI flag.

``option(...)`` declares a field; ``validate_options`` checks a dataclass against its fields' metadata (and
then runs the class's own ``check()`` for rules that span fields); ``option_specs`` lists the fields a CLI
generates flags from; ``options_meta`` is what an edit file records. Nested option dataclasses (a method's
``collect``) are validated, listed and recorded the same way.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from .errors import UsageError

_KINDS = {"float": float, "int": int, "str": str, "bool": bool}


def option(default: Any = MISSING, *, help: str, range: tuple | None = None, choices: tuple | None = None,
           flag: str | bool = True, default_factory: Any = MISSING, use: str | None = None):
    """A dataclass field with its metadata.

    ``range``: ``(low, high, bounds)`` with bounds one of ``"[]" "[)" "(]" "()"`` (``math.inf`` for no upper
    bound). ``choices``: the valid strings. ``flag``: the CLI flag (True: ``--field-name``; False: none, the
    option is reachable through ``--option KEY=VALUE`` only). ``use``: how the error message words the valid
    values when the generated wording would hide a convention (e.g. what 0 means).
    """
    meta = {"help": help, "range": range, "choices": tuple(choices) if choices else None, "flag": flag, "use": use}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as a CLI or a help text sees it. ``path``: ``(name,)`` or ``(nested, name)``."""

    path: tuple[str, ...]
    kind: type | None  # float / int / str / bool / None (structured: --option only)
    many: bool  # a tuple of ``kind`` (a repeatable flag)
    nullable: bool
    default: Any
    help: str
    flag: str | None
    range: tuple | None
    choices: tuple | None
    use: str | None = None

    @property
    def name(self) -> str:
        return self.path[-1]


def _kind_of(annotation) -> tuple[type | None, bool, bool]:
    """(kind, many, nullable) from a field annotation written as a string (``float | None``, ``tuple[int, ...]``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) != 1:
        return None, False, nullable
    p = parts[0]
    if p.startswith("tuple[") and p.endswith(", ...]"):
        return _KINDS.get(p[len("tuple["):-len(", ...]")]), True, nullable
    return _KINDS.get(p), False, nullable


def _default_of(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def option_specs(cls) -> list[OptionSpec]:
    """Every option of an options dataclass, nested option dataclasses flattened (in field order)."""
    out = []
    for f in fields(cls):
        default = _default_of(f)
        if is_dataclass(default):
            out += [OptionSpec((f.name, *s.path), *_rest(s)) for s in option_specs(type(default))]
            continue
        if "help" in f.metadata:
            out.append(_spec(f, default))
    return out


def _spec(f, default=None) -> OptionSpec:
    kind, many, nullable = _kind_of(f.type)
    flag = f.metadata["flag"]
    if flag is True:
        flag = "--" + f.name.replace("_", "-")
    return OptionSpec((f.name,), kind, many, nullable, default, f.metadata["help"], flag or None,
                      f.metadata["range"], f.metadata["choices"], f.metadata["use"])


def _rest(s: OptionSpec):
    return (s.kind, s.many, s.nullable, s.default, s.help, s.flag, s.range, s.choices, s.use)


def describe_range(rng: tuple, kind: type | None) -> str:
    """``(0, 1, "(]")`` -> "a value in (0, 1]"; ``(1, inf, "[)")`` for an int -> "an integer >= 1"."""
    lo, hi, bounds = rng
    what = "an integer" if kind is int else ("a finite number" if hi == math.inf else "a value")
    if hi == math.inf:
        return f"{what} {'>=' if bounds[0] == '[' else '>'} {lo:g}"
    return f"{what} in {bounds[0]}{lo:g}, {hi:g}{bounds[1]}"


def _in_range(v, rng) -> bool:
    lo, hi, bounds = rng
    ok_lo = v >= lo if bounds[0] == "[" else v > lo
    ok_hi = v <= hi if bounds[1] == "]" else v < hi
    return ok_lo and ok_hi and not (hi == math.inf and v == math.inf)


def check_value(spec: OptionSpec, v) -> None:
    """One clear UsageError when ``v`` is not a valid value of the option."""
    name = spec.name
    if v is None and spec.nullable:
        return
    if spec.many:
        if not isinstance(v, (list, tuple)):
            raise UsageError(f"{name}={v!r} is not valid; use a list")
        return
    kind = spec.kind
    if kind is bool:
        if not isinstance(v, bool):
            raise UsageError(f"{name}={v!r} is not valid; use true or false")
        return
    if kind in (int, float):
        integral = isinstance(v, numbers.Integral)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (kind is int and not integral) or v != v:
            want = "an integer" if kind is int else "a number"
            raise UsageError(f"{name}={v!r} is not valid; use {want}")
    if kind is str and not isinstance(v, str):
        raise UsageError(f"{name}={v!r} is not valid; use a string")
    if spec.range is not None and not _in_range(v, spec.range):
        raise UsageError(f"{name}={v!r} is out of range; use {spec.use or describe_range(spec.range, kind)}")
    if spec.choices is not None and v not in spec.choices:
        raise UsageError(f"{name}={v!r} is not valid; use one of {', '.join(spec.choices)}")


def validate_options(opts) -> None:
    """Check every field of ``opts`` (and of its nested option dataclasses) against its metadata, then the
    class's ``check()`` (rules across fields). The one place options are validated."""
    for f in fields(opts):
        v = getattr(opts, f.name)
        if is_dataclass(v) and not isinstance(v, type):
            validate_options(v)
            continue
        if "help" not in f.metadata:
            continue
        check_value(_spec(f), v)
    check = getattr(opts, "check", None)
    if check is not None:
        check()


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def options_meta(opts) -> dict:
    """The options as an edit file records them: plain JSON values (tuples as lists), nested ones nested."""
    return {k: _plain(v) for k, v in asdict(opts).items()}


def options_from_values(cls, values: dict):
    """``cls`` built from flat keyword values: top-level fields by name, nested option dataclasses' fields by
    their own names (``steps`` -> ``collect.steps``). Unknown names are a UsageError."""
    top, nested = {}, {}
    owner = {}
    for f in fields(cls):
        default = _default_of(f)
        if is_dataclass(default):
            for g in fields(default):
                owner.setdefault(g.name, f.name)
    names = {f.name for f in fields(cls)}
    unknown = []
    for k, v in values.items():
        if k in names:
            top[k] = v
        elif k in owner:
            nested.setdefault(owner[k], {})[k] = tuple(v) if isinstance(v, list) else v
        else:
            unknown.append(k)
    if unknown:
        raise UsageError(f"unknown option(s) for {cls.__name__}: {', '.join(sorted(unknown))}; "
                         f"its options are {', '.join(sorted(names | set(owner)))}")
    for f in fields(cls):
        if f.name in nested:
            base = top.get(f.name) or _default_of(f)
            top[f.name] = type(base)(**{**{g.name: getattr(base, g.name) for g in fields(base)}, **nested[f.name]})
    try:
        return cls(**top)
    except TypeError as exc:
        raise UsageError(f"{cls.__name__}: {exc}") from None
