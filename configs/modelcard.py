"""Model cards: the ``card.json`` every model folder carries, rendered as ``card.md`` for people.

Cards are written by the code that measures their figures (training, ``--write-card`` on evaluation,
the threshold chooser), never edited by hand: :class:`ModelCard` reads a folder's card, takes a
section, and writes ``card.json`` and ``card.md`` back together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SmearError

DIRTY = "+dirty"


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v) + "`"
    return str(v)


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, first seen first
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_md_value(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def render_card_md(card: dict, title: str) -> str:
    """Markdown view of a card: what the model is, data, split, config, metrics, comparisons, provenance."""
    lines = [f"# {title}", ""]
    if card.get("summary"):
        lines += [card["summary"], ""]
    lines += ["## Provenance", "", f"- kind: {card.get('kind')}", f"- classes: {', '.join(card.get('classes', []))}",
              f"- date: {card.get('date')}", f"- commit: {card.get('commit')}"]
    if card.get("best_epoch") is not None:
        minutes = card.get("train_minutes")
        lines.append(f"- best epoch: {card['best_epoch']}" + (f" ({minutes} min of training)" if minutes else ""))
    lines.append("")
    if card.get("data"):
        lines += ["## Data", ""]
        data = card["data"]
        lines += [f"- {k}: {_md_value(v)}" for k, v in data.items()] if isinstance(data, dict) else [f"- {data}"]
        lines.append("")
    if card.get("split"):
        split = card["split"]
        lines += ["## Split", "", *([f"- {k}: {_md_value(v)}" for k, v in split.items()] if isinstance(split, dict)
                                   else [str(split)]), ""]
    stages = [(role, card[role]) for role in ("refiner", "subtyper") if isinstance(card.get(role), dict)]
    if stages:
        what = {"refiner": "re-scores the crops of {groups} with >= {min_prob} of that probability",
                "subtyper": "names the subtype of crops with >= {min_prob} WBC probability, sharing out that probability"}
        lines += ["## Cascade", ""] + [f"- {role}: `{st.get('weights')}` "
                                       + what[role].format(groups=", ".join(st.get("groups", ["WBC"])),
                                                           min_prob=st.get("min_prob")) for role, st in stages] + [""]
    for key, heading in (("val_metrics", "Validation metrics"), ("test_metrics", "Test metrics (official test split)"),
                         ("test_metrics_audited", "Test metrics on audited labels (official test split, "
                                                  "scored where the audit found boxes missing or wrong as its note says)"),
                         ("count_mae_test", "Count error per image (official test split)"),
                         ("chula_val", "Chula RBC-12 counting (val)"), ("chula_test", "Chula RBC-12 counting (test)"),
                         ("crop", "Crop geometry"),
                         ("detector_coverage", "Do the RBCs reach this model? (detector on Chula fields)")):
        if card.get(key):
            lines += [f"## {heading}", "", "```json", json.dumps(card[key], indent=2), "```", ""]
    if card.get("comparison"):
        lines += ["## Measured comparison (choices made on val only)", "", _md_table(card["comparison"]), ""]
        if card.get("comparison_notes"):
            lines += [card["comparison_notes"], ""]
    if card.get("reproduce"):
        lines += ["## Reproduce", "", "```bash", *card["reproduce"], "```", ""]
    if card.get("limitations"):
        lines += ["## Limitations", ""] + [f"- {x}" for x in card["limitations"]] + [""]
    if card.get("config"):
        lines += ["## Config", "", "```json", json.dumps(card["config"], indent=2), "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, card: dict, title: str) -> None:
    """Write ``card.json`` and ``card.md`` into a model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    (folder / "card.md").write_text(render_card_md(card, title))


def card_title(kind: str, folder: Path) -> str:
    """The heading of a card: ``Detector bccd-chula-yolov8n-cpu``."""
    return f"{(kind or 'model').replace('_', ' ').capitalize()} {Path(folder).name}"


def is_shipped_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is one of the package's shipped model folders (``<stage>/models/<name>``)."""
    from .paths import PACKAGE_ROOT

    f = Path(folder).resolve()
    return f.parent.name == "models" and f.parent.parent in (PACKAGE_ROOT / "detector", PACKAGE_ROOT / "classifier")


@dataclass
class ModelCard:
    """A model folder's card: typed access to the keys inference reads, every other key kept in order.

    Example:
        >>> card = ModelCard.read(folder)
        >>> card.set("test_metrics", {"mAP50": 0.91}, commit="1a2b3c4")
        >>> card.write(folder)
    """

    kind: str = ""
    classes: tuple[str, ...] = ()
    date: str = ""
    commit: str = ""
    config: dict = field(default_factory=dict)
    operating_thresholds: dict[str, float] = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # every other key (data, split, summary, comparison, ...)
    key_order: list[str] = field(default_factory=list, repr=False)  # card.json's key order as read, kept on write

    _TYPED = ("kind", "classes", "date", "commit", "config", "operating_thresholds", "test_metrics")

    @classmethod
    def from_dict(cls, card: dict) -> "ModelCard":
        typed = {k: card[k] for k in cls._TYPED if k in card}
        if "classes" in typed:
            typed["classes"] = tuple(typed["classes"])
        return cls(**typed, extra={k: v for k, v in card.items() if k not in cls._TYPED}, key_order=list(card))

    @classmethod
    def read(cls, folder: str | Path) -> "ModelCard":
        """The card of a model folder; an empty card when it has none."""
        path = Path(folder) / "card.json"
        if not path.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise SmearError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); rewrite it with the command "
                             f"that made the model") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def set(self, key: str, value: Any) -> "ModelCard":
        """Set one section (a typed key or any other); returns the card."""
        if key in self._TYPED:
            setattr(self, key, tuple(value) if key == "classes" else value)
        else:
            self.extra[key] = value
        return self

    def to_dict(self) -> dict:
        """The card as written to ``card.json``: keys in their original order, new keys after them."""
        values = {k: (list(getattr(self, k)) if k == "classes" else getattr(self, k)) for k in self._TYPED}
        values = {k: v for k, v in values.items() if v not in ("", (), [], {}, None)}
        values.update(self.extra)
        order = [k for k in self.key_order if k in values]
        return {k: values[k] for k in order + [k for k in values if k not in order]}

    def render(self, title: str) -> str:
        return render_card_md(self.to_dict(), title)

    def write(self, folder: str | Path, title: str | None = None, allow_dirty: bool | None = None) -> Path:
        """Write ``card.json`` and ``card.md``. A shipped model's card (a folder in the package's
        ``detector/models`` or ``classifier/models``) may not name uncommitted code (``+dirty``): commit first,
        so that the card's commit reproduces the model. ``allow_dirty`` overrides that rule either way."""
        if allow_dirty is None:
            allow_dirty = not is_shipped_model_folder(folder)
        card = self.to_dict()
        commits = [card.get("commit")] + [v.get("commit") for v in card.values() if isinstance(v, dict)]
        dirty = [c for c in commits if DIRTY in str(c or "")]
        if dirty and not allow_dirty:
            raise SmearError(f"{folder}: the card names uncommitted code ({dirty[0]}); commit your changes and "
                             f"run the command again, so the card's commit reproduces its figures")
        folder = Path(folder)
        write_card(folder, card, title or card.get("title") or card_title(self.kind, folder))
        return folder
