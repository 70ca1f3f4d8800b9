"""Audit labelled fields: fixed or dropped boxes, subtype assignment, and labels known to be missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .boxes import box_iou
from .config import DataConfig
from .formats import AnnotatedImage, Box
from .taxonomy import CELL_CLASSES, GROUPS, group_of

INCOMPLETE_LABELS = "incomplete_labels.csv"


@dataclass
class AuditRow:
    image_id: str
    label: str
    box: str
    action: str  # clipped, dropped, relabelled, note
    reason: str


def _fmt_box(b: Box) -> str:
    return f"{b.x1:g},{b.y1:g},{b.x2:g},{b.y2:g}"


def audit_image(ai: AnnotatedImage, cfg: DataConfig) -> list[AuditRow]:
    """Clip, drop and deduplicate the boxes of one image in place; return what was done and why."""
    rows: list[AuditRow] = []
    kept: list[Box] = []
    for b in ai.boxes:
        if b.label not in GROUPS and b.label not in CELL_CLASSES:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", f"unknown class '{b.label}'"))
            continue
        if b.x2 <= b.x1 or b.y2 <= b.y1:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", "degenerate box (max <= min)"))
            continue
        if ai.width and ai.height:
            c = Box(b.label, max(0.0, b.x1), max(0.0, b.y1), min(float(ai.width), b.x2), min(float(ai.height), b.y2), b.score)
            if c.xyxy != b.xyxy:
                if c.x2 - c.x1 < cfg.min_box_px or c.y2 - c.y1 < cfg.min_box_px:
                    rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", "outside the image"))
                    continue
                rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "clipped",
                                     f"crossed the image border; now {_fmt_box(c)}"))
                b = c
        if b.x2 - b.x1 < cfg.min_box_px or b.y2 - b.y1 < cfg.min_box_px:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", f"smaller than {cfg.min_box_px:g} px"))
            continue
        dup = next((k for k in kept if group_of(k.label) == group_of(b.label) and box_iou(k.xyxy, b.xyxy) > cfg.duplicate_iou), None)
        if dup is not None:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped",
                                 f"near-duplicate of {_fmt_box(dup)} "
                                 f"(IoU {box_iou(dup.xyxy, b.xyxy):.2f} > {cfg.duplicate_iou:g})"))
            continue
        kept.append(b)
    ai.boxes = kept
    if not any(group_of(b.label) == "WBC" for b in kept):
        rows.append(AuditRow(ai.image_id, "", "", "note", "image has no WBC box (kept)"))
    return rows


def assign_subtypes(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> AuditRow | None:
    """Give WBC boxes their subtype where the assignment is unambiguous.

    One WBC box and one label: that label. Several WBC boxes whose labels are all the same
    subtype, one label per box: every box gets it. Anything else keeps plain ``WBC`` (kept for
    detection and group classification, excluded from subtype training) with a note.
    """
    wbcs = [b for b in ai.boxes if group_of(b.label) == "WBC"]
    if not wbcs or ai.image_id not in subtypes or any(b.label != "WBC" for b in wbcs):
        return None  # nothing to assign, or a person already named the subtypes
    labels = subtypes[ai.image_id]
    if len(wbcs) == len(labels) and len(set(labels)) == 1:
        for b in wbcs:
            b.label = labels[0]
        return None
    for b in wbcs:
        b.label = "WBC"
    # Reason kind first (before the colon), so the summary groups these notes into one line.
    return AuditRow(ai.image_id, "WBC", "", "note",
                    f"subtype not assignable: {len(wbcs)} WBC box(es) vs labels {labels or 'none'}; kept as WBC")


def missing_wbc_box(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> AuditRow | None:
    """A WBC the subtype table names in an image that has no WBC box: the box is missing, not the cell.

    BCCD's subtype table and its boxes were made separately; where the table names a WBC and no
    box holds one, the field does show a WBC (checked by eye on all six such BCCD images), so a
    detector that finds it is right, not a false positive.
    """
    named = subtypes.get(ai.image_id)
    if not named or any(group_of(b.label) == "WBC" for b in ai.boxes):
        return None
    big, typical = wbc_boxed_as_platelets(ai)
    hint = "".join(f"; its Platelets box {_fmt_box(b)} is larger than its median RBC "
                   f"({typical:g} px): likely that WBC under the wrong class" for b in big)
    scored = ("the audited evaluation scores that box as the WBC" if big else
              "the audited evaluation ignores WBC detections in this image")
    return AuditRow(ai.image_id, "WBC", "", "note", f"WBC box missing: the subtype table names {', '.join(named)}{hint}; {scored}")


def relabel_wbc_boxed_as_platelets(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> list[AuditRow]:
    """Name the WBC that :func:`wbc_boxed_as_platelets` finds as a WBC (its subtype where the table makes that
    unambiguous), for training data: the detector and the classifier then learn it as what it is."""
    big, typical = wbc_boxed_as_platelets(ai)
    for b in big:
        b.label = "WBC"
    note = assign_subtypes(ai, subtypes)
    return [AuditRow(ai.image_id, "Platelets", _fmt_box(b), "relabelled",
                     f"WBC boxed as Platelets: the subtype table names {', '.join(subtypes.get(ai.image_id, []))}, the "
                     f"image has no WBC box and this box is larger than its median RBC ({typical:g} px); now {b.label}")
            for b in big] + ([note] if note else [])


def wbc_boxed_as_platelets(ai: AnnotatedImage) -> tuple[list[Box], float]:
    """The image's "Platelets" boxes larger than its median RBC (:func:`oversized_platelets`), and that median.
    Meant for images whose WBC has no box (:func:`missing_wbc_box`)."""
    mask, typical = oversized_platelets([group_of(b.label) for b in ai.boxes],
                                        [max(b.x2 - b.x1, b.y2 - b.y1) for b in ai.boxes])
    return [b for b, m in zip(ai.boxes, mask) if m], typical


def oversized_platelets(groups: Sequence[str], sides: Sequence[float]) -> tuple[np.ndarray, float]:
    """Which of an image's boxes are "Platelets" boxes larger than its median RBC box (longest sides, any
    one unit), and that median. In an image whose WBC has no box, such a box is that WBC under the wrong
    class (BCCD 00133 and 00135, checked by eye); a platelet is a fraction of an RBC's size.

    Example:
        >>> oversized_platelets(["RBC", "RBC", "RBC", "Platelets", "Platelets"], [100, 110, 120, 25, 140])
        (array([False, False, False, False,  True]), 110.0)
    """
    groups, sides = np.asarray(groups), np.asarray(sides, dtype=float)
    rbc = sides[groups == "RBC"]
    typical = float(np.median(rbc)) if rbc.size else 0.0
    return (groups == "Platelets") & (sides > typical) & (typical > 0), typical
