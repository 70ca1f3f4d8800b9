"""Build a detector training set from completely labelled fields of several labs, at one cell scale.

Sources (``../shared/data``):

- ``bccd``: BCCD fields that ``bccd-relabel`` labels completely (its train and val fields; BCCD's own
  labels box about half the RBCs and teach a detector to pass over touching cells, so the other BCCD
  train fields stay out);
- ``pbc`` and ``raabin``: the ``txl-external`` fields of those two labs.

Every image is resized so that its median labelled RBC matches ``rbc_diameter_px`` (the scale that
``scale: auto`` brings each image to at inference), and split by a hash of its bytes (the PBC fields are
the same pictures as some ``pbc/`` single-cell images, so a content hash keeps both issues' splits
consistent). BCCD keeps its official split (relabel train -> train, relabel val -> val).
"""

from __future__ import annotations

import csv
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import parse_yolo_line, yolo_lines
from .images import read_bgr
from .splits import hash_fraction, split_by_fraction
from .taxonomy import GROUPS

log = logging.getLogger(__name__)

SOURCES = ("bccd", "pbc", "raabin")
#: class order of bccd-relabel and txl-external (their classes.txt); smear writes its own, GROUPS
_EXTERNAL_ORDER = ("WBC", "RBC", "Platelets")
#: median RBC box side in BCCD's relabelled fields (bccd-relabel, 4,204 RBCs): smear's detection scale
RBC_DIAMETER_PX = 97.5


@dataclass(frozen=True)
class Field:
    """One labelled field: image path, source, split and boxes (group, x1, y1, x2, y2) in pixels."""

    image: Path
    source: str
    split: str
    boxes: tuple[tuple[str, float, float, float, float], ...]


def content_split(data: bytes, val_fraction: float) -> str:
    """``train`` or ``val`` from a hash of the image bytes: the same picture lands in the same split anywhere."""
    return split_by_fraction(hash_fraction(data, "sha1"), val_fraction)


def _read_external_labels(path: Path, width: int, height: int) -> tuple:
    parsed = (parse_yolo_line(line, (width, height)) for line in path.read_text().splitlines())
    return tuple((_EXTERNAL_ORDER[c], *box) for c, box, _ in (p for p in parsed if p is not None))


def list_fields(shared: Path, val_fraction: float = 0.2) -> list[Field]:
    """Every completely labelled field of the three sources, with its split."""
    shared = Path(shared)
    fields: list[Field] = []
    bccd = shared / "bccd"
    sets = {s: set((bccd / "ImageSets" / "Main" / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")}
    for lbl in sorted((shared / "bccd-relabel" / "labels").glob("*.txt")):
        split = "train" if lbl.stem in sets["train"] else "val" if lbl.stem in sets["val"] else None
        if split is None:  # never a test field (the relabel holds none); guard anyway
            continue
        fields.append(Field(bccd / "JPEGImages" / f"{lbl.stem}.jpg", "bccd", split,
                            _read_external_labels(lbl, 640, 480)))
    ext = shared / "txl-external"
    with open(ext / "sources.csv", newline="") as f:
        for row in csv.DictReader(f):
            image = ext / row["image"]
            lbl = ext / "labels" / f"{image.stem}.txt"
            if not lbl.is_file():
                continue
            split = content_split(image.read_bytes(), val_fraction)
            fields.append(Field(image, row["source"], split,
                                _read_external_labels(lbl, int(row["width"]), int(row["height"]))))
    return fields


def source_scale(fields: list[Field]) -> dict[str, float]:
    """Resize factor per source: ``RBC_DIAMETER_PX`` over the source's median labelled RBC side."""
    out = {}
    for s in SOURCES:
        sides = [((x2 - x1) + (y2 - y1)) / 2 for f in fields if f.source == s for g, x1, y1, x2, y2 in f.boxes
                 if g == "RBC"]
        if sides:
            out[s] = round(RBC_DIAMETER_PX / statistics.median(sides), 4)
    return out


def write_yolo_set(fields: list[Field], out: Path, exclude: tuple[str, ...] = (),
                   val_sources: tuple[str, ...] | None = None) -> Path:
    """Write ``out/images|labels/{train,val}`` and ``out/data.yaml``; returns the data.yaml path.

    ``exclude`` leaves sources out of training (leave-one-source-out); ``val_sources`` limits val.
    """
    import cv2
    import yaml

    out = Path(out)
    scales = source_scale(fields)
    rows = []
    for f in fields:
        if f.source in exclude:
            continue
        if f.split == "val" and val_sources is not None and f.source not in val_sources:
            continue
        img = read_bgr(f.image)
        k = scales[f.source]
        h, w = img.shape[:2]
        nw, nh = max(1, round(w * k)), max(1, round(h * k))
        if (nw, nh) != (w, h):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        name = f"{f.source}_{f.image.stem}"
        (out / "images" / f.split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / f.split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "images" / f.split / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        boxes, classes = [], []
        for g, x1, y1, x2, y2 in f.boxes:
            x1, x2 = np.clip([x1, x2], 0, w)
            y1, y2 = np.clip([y1, y2], 0, h)
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                boxes.append((x1, y1, x2, y2))
                classes.append(GROUPS.index(g))
        lines = yolo_lines(boxes, classes, (w, h))
        (out / "labels" / f.split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        rows.append({"image": name, "source": f.source, "split": f.split, "scale": k, "boxes": len(lines)})
    with open(out / "fields.csv", "w", newline="") as fh:
        w_ = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w_.writeheader()
        w_.writerows(rows)
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(GROUPS))}, sort_keys=False))
    log.info("wrote %d fields to %s (scales %s)", len(rows), out, scales)
    return data
