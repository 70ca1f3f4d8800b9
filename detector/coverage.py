"""How completely a field's RBCs are boxed (``rbc_coverage``), and the RBC boxes under the threshold that fill the
red-cell pixels left uncovered (``rbc_rescue``).

``rbc_coverage`` is the share of the field's red-cell pixels (cell pixels outside WBC and platelet boxes) that RBC
boxes cover. On a lab the detector never saw, the RBCs it misses are mostly boxed but scored under the threshold
chosen on its training labs (PBC left out: 90.1% of the labelled RBCs found at the threshold, 97.5% at a score of
0.05; Raabin 82.8% and 96.9%; docs/models.md). Every box down to 0.05 would overcount, so only those that cover
red-cell pixels no kept box covers are kept, highest score first, until the field is covered as completely as
complete labels cover their fields (a median 0.95 to 0.99 by lab).
"""

from __future__ import annotations

import numpy as np

from smear.data.images import cell_mask
from smear.data.taxonomy import GROUPS

from .predict import Detections, Detector, concat_detections

RBC = GROUPS.index("RBC")
#: rbc_rescue: the lowest detector score of an RBC box it may keep
RBC_RESCUE_MIN_SCORE = 0.05
#: rbc_rescue stops once this share of the red-cell pixels is covered (complete labels: median 0.95 on BCCD val)
RBC_RESCUE_TARGET = 0.95
#: rbc_rescue keeps a box only if at least this share of its area is red-cell pixels no kept box covers
RBC_RESCUE_MIN_NEW = 0.3


def red_cell_pixels(image_rgb: np.ndarray) -> np.ndarray:
    """Cell pixels of a field (bool, H x W): the mask ``rbc_coverage`` measures against."""
    import cv2

    return cell_mask(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), background_percentile=90, clip_percentile=80) > 0


def _pixel_box(box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(0, int(np.floor(x1))), max(0, int(np.floor(y1))), min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))


def _paint(mask: np.ndarray, boxes: np.ndarray) -> None:
    h, w = mask.shape
    for b in np.asarray(boxes, float).reshape(-1, 4):
        x1, y1, x2, y2 = _pixel_box(b, (w, h))
        mask[y1:y2, x1:x2] = True


def _red_and_boxed(cells: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The red-cell pixels (``cells`` outside WBC and platelet boxes) and the pixels inside RBC boxes."""
    classes = np.asarray(classes).reshape(-1)
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    rbc, other = np.zeros(cells.shape, bool), np.zeros(cells.shape, bool)
    _paint(rbc, boxes[classes == RBC])
    _paint(other, boxes[classes != RBC])
    return cells & ~other, rbc


def rbc_coverage(image_rgb: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                 cells: np.ndarray | None = None) -> float | None:
    """Share of red-cell pixels inside RBC boxes; None for a field without red-cell pixels. ``cells``: the field's
    :func:`red_cell_pixels`, when already computed.

    Example:
        >>> rbc_coverage(image, det.boxes, det.classes)
        0.93
    """
    red, rbc = _red_and_boxed(red_cell_pixels(image_rgb) if cells is None else cells, boxes, classes)
    n = int(red.sum())
    return round(float((red & rbc).sum()) / n, 4) if n else None


def low_rbc_candidates(det: Detections, rbc_threshold: float) -> tuple[Detections, Detections]:
    """``det`` (found down to a lower RBC score) split into the boxes that reach their thresholds and the RBC boxes
    scored from :data:`RBC_RESCUE_MIN_SCORE` up to ``rbc_threshold``."""
    low = (det.classes == RBC) & (det.scores < rbc_threshold)
    return det.subset(~low), det.subset(low & (det.scores >= RBC_RESCUE_MIN_SCORE))


def rescue_rbcs(image_rgb: np.ndarray, kept: Detections, candidates: Detections,
                target: float = RBC_RESCUE_TARGET, min_new: float = RBC_RESCUE_MIN_NEW,
                cells: np.ndarray | None = None) -> Detections:
    """The RBC ``candidates`` (boxes under the threshold) that fill red-cell pixels ``kept`` leaves uncovered: taken
    highest score first while the field's RBC coverage is under ``target``, each only if at least ``min_new`` of its
    own area is red-cell pixels no kept (or already taken) box covers. Boxes of ``kept`` of other groups are no
    red-cell pixels, as in :func:`rbc_coverage`.

    Example:
        >>> kept, low = low_rbc_candidates(det, thresholds["RBC"])
        >>> extra = rescue_rbcs(image, kept, low)
    """
    if not len(candidates):
        return candidates
    red, covered = _red_and_boxed(red_cell_pixels(image_rgb) if cells is None else cells, kept.boxes, kept.classes)
    h, w = red.shape
    n_red = int(red.sum())
    if not n_red:
        return candidates.subset(np.zeros(len(candidates), bool))
    inside = int((red & covered).sum())
    take = np.zeros(len(candidates), bool)
    for i in np.argsort(-candidates.scores, kind="stable"):
        if inside / n_red >= target:
            break
        x1, y1, x2, y2 = _pixel_box(candidates.boxes[i], (w, h))
        area = max(1, (x2 - x1) * (y2 - y1))
        new = red[y1:y2, x1:x2] & ~covered[y1:y2, x1:x2]
        if new.sum() / area >= min_new:
            take[i] = True
            inside += int(new.sum())
            covered[y1:y2, x1:x2] = True
    return candidates.subset(take)


def with_rescued_rbcs(image_rgb: np.ndarray, found: Detections, rbc_threshold: float,
                      cells: np.ndarray | None = None) -> Detections:
    """``found`` (detected with RBC boxes down to :data:`RBC_RESCUE_MIN_SCORE`) as ``rbc_rescue`` keeps it: the boxes
    that reach their thresholds, then the RBC boxes under ``rbc_threshold`` that :func:`rescue_rbcs` takes.

    Example:
        >>> found = det.predict([image], conf={**thresholds, "RBC": RBC_RESCUE_MIN_SCORE})[0]
        >>> cells = with_rescued_rbcs(image, found, thresholds["RBC"])
    """
    kept, low = low_rbc_candidates(found, rbc_threshold)
    return concat_detections(kept, rescue_rbcs(image_rgb, kept, low, cells=cells))


def detect_with_rescued_rbcs(det: Detector, image_rgb: np.ndarray, thresholds: dict[str, float],
                             scale: float | str = "auto") -> Detections:
    """One field detected at ``thresholds`` as ``smear analyze`` does with ``rbc_rescue``: RBC boxes down to
    :data:`RBC_RESCUE_MIN_SCORE` (the scale measured on the boxes that reach their thresholds), then
    :func:`with_rescued_rbcs`. For benchmarks that score the detector alone.
    """
    found = det.predict([image_rgb], conf={**thresholds, "RBC": RBC_RESCUE_MIN_SCORE}, scale=scale,
                        measure_conf=min(thresholds.values()))[0]
    return with_rescued_rbcs(image_rgb, found, thresholds["RBC"])
