"""The PBC single-cell set (CellaVision DM96, Barcelona; Acevedo et al., Data in Brief 2020, CC BY 4.0) as classifier
crops: each image's centred cell boxed by a detector, split by image content; plus the boxed cells of other labs'
whole fields (txl-external: the RBCs and platelets around PBC cells, Raabin's RBCs, platelets and WBCs).

The other labs' cells matter for the group decision: without RBCs and platelets from PBC's own fields, a classifier
could learn "PBC colours -> a WBC" instead of what a WBC looks like. Raabin's WBCs carry no subtype: their rows are
labelled ``WBC`` and train the group only (the classifier's set-valued loss).

PBC images are 360x363 px with one cell of interest in the centre and no box. Crops are cut relative to the cell's
box (as at inference, where the detector gives the box), so the centred cell is boxed by a detector's ``propose``
(passed in, so that data never imports a model stage): the box of the expected group nearest the centre that covers
it. An image where no such box is found gets a centred square of the median side of that class's found boxes
(``box_from`` says which).

Splits hash each image's bytes (sha1), the key ``smear.data.complete`` uses for the same pictures among the
txl-external PBC fields, so a picture lands in one split whichever set it is read from.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smear.configs.errors import SmearError

from .images import read_image
from .splits import hash_fraction, split_by_fraction
from .taxonomy import GROUPS, group_of

log = logging.getLogger(__name__)

#: PBC class folder -> smear's class name
PBC_CLASSES = {"neutrophil": "Neutrophil", "eosinophil": "Eosinophil", "lymphocyte": "Lymphocyte",
               "monocyte": "Monocyte", "basophil": "Basophil", "ig": "ImmatureGranulocyte",
               "erythroblast": "Erythroblast", "platelet": "Platelets"}

#: ``propose(rgb)`` -> detections of one image with ``boxes`` (N, 4 xyxy), ``scores`` and ``classes`` (GROUPS indices)
ProposeBoxes = Callable[[np.ndarray], Any]

MANIFEST_FIELDS = ["crop_path", "source_image", "image_id", "x1", "y1", "x2", "y2", "label", "group", "split",
                   "source", "box_from"]


@dataclass
class PbcImage:
    path: Path
    label: str  # smear's class name
    subclass: str
    image_id: str  # sha1 of the bytes
    split: str


def list_pbc(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15) -> list[PbcImage]:
    """The images of ``root/labels.csv`` with smear's class names and content-hashed splits."""
    labels = Path(root) / "labels.csv"
    if not labels.is_file():
        raise SmearError(f"{labels}: not found; expected the PBC folder (labels.csv, <class>/*.jpg)")
    out = []
    with open(labels, newline="") as f:
        for r in csv.DictReader(f):
            cls = PBC_CLASSES.get(r["class"].strip().lower())
            if cls is None:
                raise SmearError(f"{labels}: unknown class {r['class']!r} (known: {', '.join(PBC_CLASSES)})")
            path = Path(root) / r["image"]
            data = path.read_bytes()
            out.append(PbcImage(path, cls, r.get("subclass") or "", hashlib.sha1(data).hexdigest(),
                                split_by_fraction(hash_fraction(data, "sha1"), val_fraction, test_fraction)))
    return out


def expected_groups(label: str) -> tuple[str, ...]:
    """Detector groups a centred cell of ``label`` may be boxed as (an erythroblast looks like either)."""
    if label == "Erythroblast":
        return ("WBC", "RBC")
    return (group_of(label),)


def centred_box(found: Any, size: tuple[int, int], groups: Iterable[str]) -> np.ndarray | None:
    """The box of one of ``groups`` that covers the image centre, nearest to it; ``None`` when there is none."""
    w, h = size
    boxes = np.asarray(getattr(found, "boxes", np.zeros((0, 4))), float).reshape(-1, 4)
    if not len(boxes):
        return None
    classes = np.asarray(found.classes).astype(int)
    want = np.isin(classes, [GROUPS.index(g) for g in groups])
    cx, cy = w / 2, h / 2
    covers = (boxes[:, 0] <= cx) & (boxes[:, 2] >= cx) & (boxes[:, 1] <= cy) & (boxes[:, 3] >= cy)
    ok = np.flatnonzero(want & covers)
    if not len(ok):
        return None
    d = np.hypot((boxes[ok, 0] + boxes[ok, 2]) / 2 - cx, (boxes[ok, 1] + boxes[ok, 3]) / 2 - cy)
    return boxes[ok[int(d.argmin())]]


def field_rows(fields: Iterable[Any], val_fraction: float = 0.15, test_fraction: float = 0.15) -> list[dict]:
    """Manifest rows of labelled whole fields (``smear.data.complete.Field``) from labs other than BCCD.

    The WBC boxes of PBC fields are left out: each PBC field is the same picture as a ``pbc/`` image, whose centred
    cell is already a row with its subtype. Splits hash the bytes as :func:`list_pbc` does."""
    rows = []
    for f in fields:
        if f.source == "bccd":
            continue
        data = Path(f.image).read_bytes()
        image_id = f"{f.source}_{hashlib.sha1(data).hexdigest()}"
        split = split_by_fraction(hash_fraction(data, "sha1"), val_fraction, test_fraction)
        for g, x1, y1, x2, y2 in f.boxes:
            if f.source == "pbc" and g == "WBC":
                continue
            rows.append({"crop_path": "", "source_image": str(f.image), "image_id": image_id, "x1": round(x1, 1),
                         "y1": round(y1, 1), "x2": round(x2, 1), "y2": round(y2, 1), "label": g, "group": g,
                         "split": split, "source": f.source, "box_from": "label", "subclass": ""})
    return rows


def build_pbc_manifest(root: Path, out: Path, propose: ProposeBoxes, val_fraction: float = 0.15,
                       test_fraction: float = 0.15, limit: int = 0, fields: Iterable[Any] = ()) -> Path:
    """Write ``out/manifest.csv`` (the crop manifest's columns plus ``source`` and ``box_from``) for the PBC images,
    and for the cells of ``fields`` (:func:`field_rows`).

    No crop images are written: training cuts its crops from the source images with jitter. ``limit`` > 0 takes
    that many images per class (for a quick look)."""
    images = list_pbc(root, val_fraction, test_fraction)
    if limit:
        images = [im for c in PBC_CLASSES.values() for im in [i for i in images if i.label == c][:limit]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    missing: list[tuple[int, tuple[int, int]]] = []
    for k, im in enumerate(images):
        rgb = read_image(im.path)
        h, w = rgb.shape[:2]
        box = centred_box(propose(rgb), (w, h), expected_groups(im.label))
        if box is None:
            missing.append((k, (w, h)))
        rows.append({"crop_path": "", "source_image": str(im.path), "image_id": f"pbc_{im.image_id}",
                     "label": im.label, "group": group_of(im.label), "split": im.split, "source": "pbc",
                     "subclass": im.subclass, "box_from": "detector",
                     **({} if box is None else dict(zip(("x1", "y1", "x2", "y2"), (round(float(v), 1) for v in box))))})
        if (k + 1) % 500 == 0:
            log.info("%d / %d PBC images boxed", k + 1, len(images))
    sides: dict[str, list[float]] = {}  # each class's boxed sides, for the images where no box was found
    for q in rows:
        if "x1" in q:
            sides.setdefault(q["label"], []).append(q["x2"] - q["x1"])
    for k, (w, h) in missing:
        r = rows[k]
        side = float(np.median(sides[r["label"]])) if r["label"] in sides else 0.5 * min(w, h)
        r.update(box_from="median", x1=round(w / 2 - side / 2, 1), y1=round(h / 2 - side / 2, 1),
                 x2=round(w / 2 + side / 2, 1), y2=round(h / 2 + side / 2, 1))
    rows += field_rows(fields, val_fraction, test_fraction)
    path = out / "manifest.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS + ["subclass"])
        wr.writeheader()
        wr.writerows(rows)
    return path
