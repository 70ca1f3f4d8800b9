"""Typed, frozen component configs and the one loader for them.

Every component has a frozen dataclass whose fields carry their range and meaning
(:func:`param`). Defaults live in code and are mirrored in ``configs/*.yaml``; a YAML file
overrides the defaults and ``key=value`` overrides (CLI flags) override the YAML. Unknown
keys are an error that suggests the nearest valid key; out-of-range values say what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)
# The detector score the pipeline keeps, chosen on val (PipelineConfig.conf); DetectorConfig shares it.
OPERATING_CONF = 0.4
FROM_DETECTOR = "detector"  # class_conf entry: the operating thresholds of the detector's card


def _from_detector(entry: Any) -> bool:
    return str(entry).strip().lower() == FROM_DETECTOR


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
            raise ConfigError(f"{source}: unknown {cls.__name__} key '{key}'{hint} Valid keys: {', '.join(fields)}")
        kwargs[norm] = _coerce(f"{cls.__name__}.{norm}", raw, hints[norm])
    for name, f in fields.items():
        _validate(cls.__name__, f, kwargs.get(name, f.default))
    return cls(**kwargs)


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


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How ``smear analyze`` merges the two stages and which indicators it may raise (configs/pipeline.yaml)."""

    detector_weights: str = param("", "detector .pt or model folder; '' for the shipped default")
    classifier_weights: str = param("", "classifier model folder; '' for the shipped default")
    conf: float = param(OPERATING_CONF, "minimum detector score kept for classes class_conf gives no threshold; "
                                        "0.001 gives the full ranked list for mAP (--conf, --set conf or a YAML file "
                                        "that sets conf without class_conf means one threshold for every class)",
                        range=(0.0, 1.0))
    class_conf: tuple[str, ...] = param((FROM_DETECTOR,), "per-class minimum detector score: 'detector' takes the "
                                        "operating thresholds recorded in the detector's card (chosen on val for "
                                        "that model; shipped default: RBC and WBC 0.4, Platelets 0.45; GPU-trained "
                                        "bccd-chula-yolov8n: Platelets 0.55), Class=score sets one class, later "
                                        "entries win; [] uses conf for all")
    iou: float = param(0.5, "detector NMS IoU", range=(0.05, 1.0))
    edge_fragment_min: float = param(0.5, "an RBC cut by the field border is counted only when this fraction of a "
                                          "typical RBC's diameter lies inside (0.5: the field holding its centre "
                                          "counts it); 0 counts every fragment", range=(0.0, 1.0))
    device: str = param("cpu", "torch device: cpu, cuda, cuda:0, mps")
    batch: int = param(8, "images per detector batch", range=(1, 1024))
    threads: int = param(0, "torch CPU threads; 0: one per core (ultralytics alone would use cores - 1)",
                          range=(0, 256))
    scale: float = param(1.0, "resize factor applied before detection (other microscopes)", range=(0.05, 20.0))
    pixel_size_um: float = param(0.0, "micrometres per pixel of the inputs; 0 if unknown (sizes then in px)", range=(0.0, 100.0))
    match_training_scale: bool = param(False, "with pixel_size_um set, resize inputs to the detector's training scale")
    group_override_prob: float = param(0.9, "classifier group probability that overrides the detector's group", range=(0.5, 1.0))
    review_prob: float = param(0.5, "classifier probability for another group that marks a cell for review", range=(0.0, 1.0))
    low_confidence_wbc: float = param(0.5, "WBC subtype probability below which a WBC counts as unplaced", range=(0.0, 1.0))
    capture_mode: str = param("wbc-centred", "how fields were chosen; decides which flags apply",
                              choices=("wbc-centred", "random"))
    min_rbc_for_ratio: int = param(300, "RBCs needed before a platelet or WBC ratio is judged", range=(1, None))
    min_wbc_for_differential: int = param(100, "WBCs needed before a differential is judged", range=(1, None))
    min_fields_for_estimate: int = param(10, "fields needed before a per-field estimate is judged", range=(1, None))
    platelet_factor_per_field: float = param(0.0, "calibration: platelets/uL per platelet per field (0 = none)",
                                             range=(0.0, None))
    wbc_factor_per_field: float = param(0.0, "calibration: WBC/uL per WBC per field (0 = none)", range=(0.0, None))
    field_area_um2: float = param(0.0, "calibration: area of one field in um^2 (0 = unknown), reported as density",
                                  range=(0.0, None))
    morphology_weights: str = param("", "RBC morphology model folder; '' for the shipped default if present, 'none' to skip")

    def __post_init__(self) -> None:
        self.thresholds()  # a bad class_conf entry fails when the config is made, not mid-batch

    @staticmethod
    def implied(values: dict[str, Any]) -> dict[str, Any]:
        """A layer of values (YAML file, CLI overrides) that sets ``conf`` and not ``class_conf`` means one
        threshold for every class: it clears ``class_conf`` for that layer, so a later layer still wins.

        Example:
            >>> PipelineConfig.implied({"conf": 0.3})
            {'conf': 0.3, 'class_conf': ()}
        """
        if "conf" in values and values["conf"] is not None and "class_conf" not in values:
            return {**values, "class_conf": ()}
        return values

    def one_threshold(self, conf: float) -> "PipelineConfig":
        """This config with ``conf`` for every class (``class_conf`` cleared), e.g. for a full ranked list."""
        return dataclasses.replace(self, conf=conf, class_conf=())

    def thresholds(self, detector_card: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Minimum detector score per group: ``conf``, then the ``class_conf`` entries in order.

        The ``detector`` entry gives the ``operating_thresholds`` of ``detector_card`` (a model card's
        per-group thresholds, chosen on val for that model); without a card, or a card without them, it
        gives nothing and ``conf`` stands.

        Example:
            >>> PipelineConfig(conf=0.4, class_conf=("Platelets=0.55",)).thresholds()
            {'RBC': 0.4, 'WBC': 0.4, 'Platelets': 0.55}
            >>> PipelineConfig().thresholds({"operating_thresholds": {"Platelets": 0.55}})
            {'RBC': 0.4, 'WBC': 0.4, 'Platelets': 0.55}
        """
        from .dataset import GROUPS, _canonical_label

        out = {g: self.conf for g in GROUPS}
        for item in self.class_conf:
            if _from_detector(item):
                tuned = (detector_card or {}).get("operating_thresholds") or {}
                out.update({g: float(t) for g, t in tuned.items() if g in out})
                continue
            name, sep, value = str(item).replace(":", "=", 1).partition("=")
            group = _canonical_label(name) if sep else ""
            try:
                score = float(value)
            except ValueError:
                score = float("nan")
            if group not in GROUPS or not 0.0 <= score <= 1.0:
                raise ConfigError(f"PipelineConfig.class_conf: got {item!r}; expected '{FROM_DETECTOR}' or "
                                  f"Class=score with Class one of {', '.join(GROUPS)} and score between 0 and 1 "
                                  "(e.g. Platelets=0.55)")
            out[group] = score
        return out

    def for_detector(self, detector_card: Mapping[str, Any] | None) -> "PipelineConfig":
        """This config with the ``detector`` entry of ``class_conf`` replaced by that detector's thresholds.

        The result names every threshold explicitly, so what a run records is what it counted with.

        Example:
            >>> PipelineConfig().for_detector({"operating_thresholds": {"Platelets": 0.55}}).class_conf
            ('Platelets=0.55',)
        """
        if not any(_from_detector(i) for i in self.class_conf):
            return self
        own = self.thresholds(detector_card)
        if self.conf != OPERATING_CONF and all(t != self.conf for t in own.values()):
            log.warning(
                "conf %g is used for no class: class_conf %s sets every class (%s); for one threshold give "
                "--conf, or class_conf: [] beside conf in the YAML", self.conf, list(self.class_conf),
                ", ".join(f"{g} {t:g}" for g, t in own.items()))
        return dataclasses.replace(self, class_conf=tuple(f"{g}={t:g}" for g, t in own.items() if t != self.conf))

