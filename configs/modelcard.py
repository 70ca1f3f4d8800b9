"""Model cards: the ``card.json`` every model folder carries, rendered as ``card.md`` for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
              f"- date: {card.get('date')}", f"- commit: {card.get('commit')}", ""]
    if card.get("data"):
        lines += ["## Data", ""]
        data = card["data"]
        lines += [f"- {k}: {_md_value(v)}" for k, v in data.items()] if isinstance(data, dict) else [f"- {data}"]
        lines.append("")
    if card.get("split"):
        lines += ["## Split", "", str(card["split"]), ""]
    for key, heading in (("val_metrics", "Validation metrics"), ("test_metrics", "Test metrics (official test split)"),
                         ("test_metrics_audited", "Test metrics on audited labels (official test split, "
                                                  "scored where the audit found boxes missing or wrong as its note says)"),
                         ("count_mae_test", "Count error per image (official test split)"),
                         ("chula_val", "Chula RBC-12 counting (val)"), ("chula_test", "Chula RBC-12 counting (test)")):
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
