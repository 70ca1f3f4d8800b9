"""Package a trained classifier folder (any task) as a shipped model: its files, and its card with the
sections added after training (summary, comparison, cascade links), rendered as ``card.md``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .model import write_model_card

# Everything a model folder may hold besides weights.pt and the card (split.json: rbc-morphology).
MODEL_FILES = ("weights.pt", "history.json", "curves.png", "split.json", "confusion_matrix_test.png")


def package_model(model_folder: str | Path, dest: str | Path, extra: dict | None = None) -> Path:
    """Copy ``model_folder`` (``project/name/model``) to ``dest`` (e.g. the shipped models folder) with its
    card updated by ``extra``.

    Example:
        >>> package_model("runs/classifier/mnv2-48/model", shipped_models_dir() / "bccd-mobilenetv2-48",
        ...               {"summary": "Cascade crop classifier ..."})
    """
    model_folder, dest = Path(model_folder), Path(dest)
    card = json.loads((model_folder / "card.json").read_text())
    card.update(extra or {})
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, dest / name)
    write_model_card(dest, card)
    return dest
