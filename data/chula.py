"""Chula RBC-12: point labels (``Label/N.txt`` lines ``x y class``) of the fields in ``Dataset/N.jpg``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from smear.configs.errors import SmearError

from .formats import SPLITS
from .splits import hash_fraction, split_by_fraction
from .taxonomy import MORPHOLOGY_CLASSES

log = logging.getLogger(__name__)


@dataclass
class PointLabel:
    """One labelled cell: its centre in image pixels and its class name."""

    image_id: str
    image: str
    x: float
    y: float
    label: str


def _id_key(image_id: str) -> tuple[int, str]:
    return (int(image_id), image_id) if image_id.isdigit() else (10**9, image_id)


def read_chula(root: str | Path) -> dict[str, list[PointLabel]]:
    """Labelled cells per image id of a Chula RBC-12 folder, ids in numeric order.

    Images without a label file are left out (they have no cells to learn from); label files
    without an image and lines that do not parse are skipped with a warning.
    """
    root = Path(root)
    img_dir, lbl_dir = root / "Dataset", root / "Label"
    if not img_dir.is_dir() or not lbl_dir.is_dir():
        raise SmearError(f"{root}: not a Chula RBC-12 folder (expected Dataset/ and Label/); "
                         f"set data_root to the folder that holds them")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    out: dict[str, list[PointLabel]] = {}
    bad = 0
    for lbl in sorted(lbl_dir.glob("*.txt"), key=lambda p: _id_key(p.stem)):
        if lbl.stem not in images:
            log.warning("%s: label file without an image, skipped", lbl)
            continue
        cells = []
        for line in lbl.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            try:
                x, y, k = float(parts[0]), float(parts[1]), int(parts[2])
                cells.append(PointLabel(lbl.stem, str(images[lbl.stem]), x, y, MORPHOLOGY_CLASSES[k]))
            except (IndexError, ValueError):
                bad += 1
        if cells:
            out[lbl.stem] = cells
    if bad:
        log.warning("%s: %d label lines did not parse as 'x y class(0-12)' and were skipped", lbl_dir, bad)
    if not out:
        raise SmearError(f"{lbl_dir}: no labelled cells found (lines 'x y class', class 0-12)")
    return out


def split_of(image_id: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Deterministic split of one image: a hash of seed and id, so adding images moves none."""
    return split_by_fraction(hash_fraction(f"chula:{seed}:{image_id}"), val_fraction, test_fraction)


def split_images(image_ids: Iterable[str], val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` image ids, by image, in numeric order."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i in sorted(image_ids, key=_id_key):
        out[split_of(i, val_fraction, test_fraction, seed)].append(i)
    return out
