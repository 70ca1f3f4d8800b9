"""Matching predictions to true cells: greedy by score (COCO), per class for AP, class-agnostic for ``cells.csv``."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from smear.data.boxes import iou_matrix
from smear.data.taxonomy import SUBTYPES, group_of

from ..results import Cell
from .tables import BOX_COLUMNS, round_or_blank

MATCH_IOU = 0.5
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def match_greedy(pred_scores: Sequence[float], ious: np.ndarray, iou_threshold: float = MATCH_IOU) -> np.ndarray:
    """One-to-one matching, highest score first (COCO): each prediction takes the unmatched true box
    it overlaps most, if that IoU is >= ``iou_threshold``.

    Args:
        pred_scores: (N,) prediction scores.
        ious: (N, M) IoU of predictions with true boxes (see :func:`smear.data.boxes.iou_matrix`).

    Returns:
        (N,) index of the matched true box per prediction, in input order; -1 for unmatched.
    """
    scores = np.asarray(pred_scores, dtype=np.float64)
    out = np.full(len(scores), -1, dtype=np.int64)
    if not len(scores) or not ious.shape[1]:
        return out
    free = np.ones(ious.shape[1], dtype=bool)
    for p in np.argsort(-scores, kind="mergesort"):
        cand = np.where(free, ious[p], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            out[p] = j
            free[j] = False
    return out


def per_class_true_positives(pred_images: Sequence[str], pred_boxes: np.ndarray, pred_labels: Sequence[str],
                             pred_scores: Sequence[float], true_images: Sequence[str], true_boxes: np.ndarray,
                             true_labels: Sequence[str],
                             thresholds: Sequence[float] = IOU_THRESHOLDS) -> np.ndarray:
    """Whether each prediction is a true positive at each IoU threshold, matching within image and class.

    Returns:
        (N predictions, len(thresholds)) bool array, in input order.
    """
    pred_images, pred_labels = np.asarray(pred_images, dtype=object), np.asarray(pred_labels, dtype=object)
    true_images, true_labels = np.asarray(true_images, dtype=object), np.asarray(true_labels, dtype=object)
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    true_boxes = np.asarray(true_boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(pred_scores, dtype=np.float64)
    tp = np.zeros((len(scores), len(thresholds)), dtype=bool)
    true_index: dict[tuple[str, str], list[int]] = {}
    for j, key in enumerate(zip(true_images, true_labels)):
        true_index.setdefault(key, []).append(j)
    pred_index: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(pred_images, pred_labels)):
        pred_index.setdefault(key, []).append(i)
    for key, pi in pred_index.items():
        tj = true_index.get(key)
        if not tj:
            continue
        ious = iou_matrix(pred_boxes[pi], true_boxes[tj])
        for k, thr in enumerate(thresholds):
            tp[pi, k] = match_greedy(scores[pi], ious, thr) >= 0
    return tp


def match_image_cells(image: str, truths: Sequence[tuple[Sequence[float], str]], cells: Sequence[Cell],
                      iou_threshold: float = MATCH_IOU) -> list[dict[str, Any]]:
    """``cells.csv`` rows of one image: true cells (box, label) paired class-agnostically with predicted cells.

    Pairs are made highest detector score first, since the operating set of boxes is the
    detector's; labels are then compared at group level (and subtype level where known).
    """
    true_boxes = np.array([t[0] for t in truths], dtype=np.float64).reshape(-1, 4)
    pred_boxes = np.array([c.box for c in cells], dtype=np.float64).reshape(-1, 4)
    ious = iou_matrix(pred_boxes, true_boxes)
    match = match_greedy([c.detector["score"] for c in cells], ious, iou_threshold)
    pred_of_true = {int(j): i for i, j in enumerate(match) if j >= 0}
    rows = []

    def row(t: int | None, p: int | None) -> dict[str, Any]:
        r: dict[str, Any] = {"image": image}
        label = truths[t][1] if t is not None else ""
        r.update({f"true_{k}": (round(float(v), 1) if t is not None else "") for k, v in
                  zip(BOX_COLUMNS, truths[t][0] if t is not None else [0] * 4)})
        r["true_group"] = group_of(label) if label else ""
        r["true_subtype"] = label if label in SUBTYPES else ""
        c = cells[p] if p is not None else None
        r.update({f"pred_{k}": (round(float(v), 1) if c is not None else "") for k, v in
                  zip(BOX_COLUMNS, c.box if c is not None else [0] * 4)})
        best = float(ious[p, t]) if t is not None and p is not None else \
            float(ious[p].max()) if p is not None and ious.shape[1] else None
        r["iou"] = round_or_blank(best)
        r["detector_label"] = c.detector["label"] if c else ""
        r["detector_score"] = round_or_blank(c.detector["score"]) if c else ""
        r["classifier_label"] = c.classifier.get("label", "") if c else ""
        r["classifier_score"] = round_or_blank(c.classifier.get("score")) if c else ""
        r["final_group"] = c.group if c else ""
        r["final_label"] = c.label if c else ""
        r["score"] = round_or_blank(c.score) if c else ""
        if t is not None and p is None:
            outcome = "missed"
        elif t is None:
            # unmatched yet overlapping a true cell: that cell was taken by a higher-scoring detection
            outcome = "duplicate" if best is not None and best >= iou_threshold else "false_detection"
        else:
            det_ok, final_ok = r["detector_label"] == r["true_group"], r["final_group"] == r["true_group"]
            outcome = ("correct" if det_ok and final_ok else "detector_wrong_corrected_by_classifier" if final_ok
                       else "classifier_broke_correct_detection" if det_ok else "both_wrong")
        r["outcome"] = outcome
        if r["true_subtype"]:
            r["subtype_outcome"] = ("missed" if p is None else "wrong_group" if r["final_group"] != "WBC"
                                    else "correct" if r["final_label"] == r["true_subtype"] else "wrong_subtype")
        else:
            r["subtype_outcome"] = ""
        return r

    for t in range(len(truths)):
        rows.append(row(t, pred_of_true.get(t)))
    for p in range(len(cells)):
        if match[p] < 0:
            rows.append(row(None, p))
    return rows
