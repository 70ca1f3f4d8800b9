"""Typed, frozen component configs and the one loader for them.

Every component has a frozen dataclass whose fields carry their range and meaning
(:func:`param`). Defaults live in code and are mirrored in ``configs/*.yaml``; a YAML file
overrides the defaults and ``key=value`` overrides (CLI flags) override the YAML. Unknown
keys are an error that suggests the nearest valid key; out-of-range values say what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def param(default: Any, help: str, *, range: tuple[float | None, float | None] | None = None,
          choices: typing.Sequence[Any] | None = None) -> Any:
    """A config field with its meaning and valid values, for validation and YAML comments."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "range": range, "choices": choices}}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults; configs are frozen")
    return dataclasses.field(default=default, **kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce YAML / CLI text to the field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: got {value!r}, expected {' or '.join(_type_name(a) for a in args)}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if isinstance(value, dict):  # a YAML mapping (class_conf: {Platelets: 0.55}) as key=value items
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: got {value!r}, expected a list")
        inner = args[0] if args else str
        return tuple(_coerce(name, v, inner) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: got {value!r}, expected an integer")
        try:
            f = float(value)
            if f != int(f):  # int() of inf / nan raises: also not an integer
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: got {value!r}, expected an integer") from None
        return int(f)
    if tp is float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: got {value!r}, expected a number") from None
        if f != f:  # NaN passes every range comparison
            raise ConfigError(f"{name}: got {value!r}, expected a number")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: got {value!r}, expected text")
        return str(value)
    return value


def _validate(cls_name: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{cls_name}.{f.name}: got {value!r}; valid values are {', '.join(map(repr, choices))}")
    rng = meta.get("range")
    if rng is not None and value is not None:
        lo, hi = rng
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                lo_s = "-inf" if lo is None else lo
                hi_s = "inf" if hi is None else hi
                raise ConfigError(f"{cls_name}.{f.name}: got {v!r}; valid range is [{lo_s}, {hi_s}]")


def build_config(cls: type[T], values: Mapping[str, Any] | None = None, *, source: str = "overrides") -> T:
    """Make a config of type ``cls`` from defaults updated with ``values``.

    Raises:
        ConfigError: on an unknown key (with the nearest valid key) or an invalid value.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            near = difflib.get_close_matches(norm, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"{source}: unknown {cls.__name__} key {key!r}{hint} Valid keys: {', '.join(fields)}")
        kwargs[norm] = _coerce(f"{cls.__name__}.{norm}", raw, hints[norm])
    for name, f in fields.items():
        _validate(cls.__name__, f, kwargs.get(name, f.default))
    return cls(**kwargs)


def build_known_config(cls: type[T], values: Mapping[str, Any], *, source: str = "stored settings") -> T:
    """:func:`build_config` from settings stored by another version (a model card, a run's ``run.json``): keys this
    version does not know are left out, the others are checked as usual."""
    known = {f.name for f in dataclasses.fields(cls)}
    return build_config(cls, {k: v for k, v in values.items() if k.replace("-", "_") in known}, source=source)


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (CLI) into a dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. epochs=40)")
        key, value = item.split("=", 1)
        try:
            out[key.strip().lstrip("-")] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # not a YAML scalar (e.g. 'name=[x'): keep the text, the loader checks its type
            out[key.strip().lstrip("-")] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    Example:
        >>> from smear.detector.config import DetectorConfig
        >>> cfg = load_config(DetectorConfig, None, {"epochs": 3})
    """
    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value lines, got {type(data).__name__}")
        build_config(cls, data, source=str(p))  # report errors against the file first
        values.update(_layer(cls, data))
        source = str(p)
    if overrides:
        build_config(cls, overrides, source="overrides")
        values.update(_layer(cls, overrides))
    return build_config(cls, values, source=source)


def _layer(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """One layer of values (a YAML file or the overrides) with what it implies: a config class may
    define ``implied(values)``, e.g. PipelineConfig's 'a layer that sets conf alone means one threshold'."""
    out = {k.replace("-", "_"): v for k, v in values.items()}
    implied = getattr(cls, "implied", None)
    return implied(out) if implied is not None else out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config (tuples as lists), for JSON and YAML."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def dump_config(cfg: Any) -> str:
    """YAML text of a config, one ``key: value  # (type, range) meaning`` line per field."""
    hints = typing.get_type_hints(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        text = yaml.safe_dump({f.name: list(value) if isinstance(value, tuple) else value},
                              default_flow_style=True, width=10_000).strip().strip("{}")
        meta = f.metadata
        kind = _type_name(hints[f.name])
        if meta.get("choices") is not None:
            kind += ", one of " + "|".join(str(c) for c in meta["choices"])
        elif meta.get("range") is not None:
            lo, hi = meta["range"]
            kind += f", {'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        lines.append(f"{text}  # ({kind}) {meta.get('help', '')}")
    return "\n".join(lines) + "\n"
