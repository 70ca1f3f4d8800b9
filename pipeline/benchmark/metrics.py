"""Benchmark figures from the tables: AP (COCO 101-point), cell metrics (sklearn.metrics), count errors per image,
flags over the whole set, and which stage made each error."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from smear.data.taxonomy import GROUPS, SUBTYPES

from ..config import PipelineConfig
from .matching import IOU_THRESHOLDS, per_class_true_positives
from .tables import (
    BOX_COLUMNS,
    COUNT_CLASSES,
    LABEL_COLUMN,
    MODES,
    OUTCOMES,
    SCORE_COLUMN,
    SUBTYPE_OUTCOMES,
    decisive_flags,
)

BACKGROUND = "background"
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


# ---------------------------------------------------------------- AP

def average_precision(scores: Sequence[float], true_positive: Sequence[bool], n_true: int) -> float | None:
    """COCO average precision: mean interpolated precision at 101 recall points (0, 0.01, ..., 1).

    Precision at recall r is the highest precision at any recall >= r; recall levels never
    reached count as precision 0. ``None`` when there are no true cells of the class.
    Checked against pycocotools' COCOeval in the tests.

    Example:
        >>> average_precision([0.9, 0.8], [True, True], 2)
        1.0
    """
    if n_true <= 0:
        return None
    scores = np.asarray(scores, dtype=np.float64)
    tp = np.asarray(true_positive, dtype=bool)
    if not len(scores):
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / n_true
    precision = ctp / np.maximum(ctp + cfp, 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(np.mean(q))


def detection_ap(pred_images, pred_boxes, pred_labels, pred_scores, true_images, true_boxes, true_labels,
                 classes: Sequence[str] = GROUPS, thresholds: Sequence[float] = IOU_THRESHOLDS,
                 true_positive: np.ndarray | None = None) -> dict[str, list[float | None]]:
    """AP per class at each IoU threshold (``None`` for a class without true cells)."""
    if true_positive is None:
        true_positive = per_class_true_positives(pred_images, pred_boxes, pred_labels, pred_scores, true_images,
                                                 true_boxes, true_labels, thresholds)
    pred_labels = np.asarray(pred_labels, dtype=object)
    true_labels = list(true_labels)
    scores = np.asarray(pred_scores, dtype=np.float64)
    out = {}
    for c in classes:
        sel = pred_labels == c
        n_true = true_labels.count(c)
        out[c] = [average_precision(scores[sel], true_positive[sel, k], n_true) for k in range(len(thresholds))]
    return out


def ap_metrics(detections, cells, mode: str) -> dict[str, Any]:
    """mAP50, mAP50-95 and per-class AP from ``detections.csv`` and the true rows of ``cells.csv``.

    AP50 uses the ``tp50_<mode>`` column as written, so it can be checked by hand; the other
    thresholds re-run the same matching.
    """
    truth = cells[cells["true_group"] != ""]
    pb = detections[[f"pred_{k}" for k in BOX_COLUMNS]].to_numpy(float)
    tb = truth[[f"true_{k}" for k in BOX_COLUMNS]].to_numpy(float)
    tp = per_class_true_positives(detections["image"], pb, detections[LABEL_COLUMN[mode]],
                                  detections[SCORE_COLUMN[mode]], truth["image"], tb, truth["true_group"])
    tp[:, 0] = detections[f"tp50_{mode}"].astype(bool).to_numpy()
    ap = detection_ap(detections["image"], pb, detections[LABEL_COLUMN[mode]], detections[SCORE_COLUMN[mode]],
                      truth["image"], tb, truth["true_group"], true_positive=tp)
    ap50 = {c: (round(v[0], 4) if v[0] is not None else None) for c, v in ap.items()}
    ap5095 = {c: (round(float(np.mean(v)), 4) if v[0] is not None else None) for c, v in ap.items()}
    present = [c for c in GROUPS if ap50[c] is not None]
    return {"mAP50": _mean(ap50[c] for c in present), "mAP50_95": _mean(ap5095[c] for c in present),
            "AP50": ap50, "AP50_95": ap5095, "n_candidates": len(detections)}


# ---------------------------------------------------------------- cells

def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _mean(values: Iterable[float]) -> float | None:
    v = [float(x) for x in values]
    return round(float(np.mean(v)), 4) if v else None


def _score(v: float) -> float | None:
    """A sklearn score as the summary writes it: rounded to 4 decimals, None where undefined (0/0)."""
    return None if np.isnan(v) else round(float(v), 4)


def _confusion(true, pred, labels: Sequence[str]) -> np.ndarray:
    """sklearn's confusion matrix (rows true, columns predicted); all zeros without rows, which sklearn refuses."""
    from sklearn.metrics import confusion_matrix

    if not len(true):
        return np.zeros((len(labels), len(labels)), dtype=np.int64)
    return confusion_matrix(true, pred, labels=list(labels))


def _precision_recall_f1(true, pred, labels: Sequence[str], average: str | None):
    """sklearn's precision, recall and F1 over ``labels`` (NaN where a ratio is 0/0, as without rows)."""
    from sklearn.metrics import precision_recall_fscore_support

    if not len(true):
        nan = np.full(len(labels), np.nan) if average is None else np.nan
        return nan, nan, nan
    p, r, f1, _ = precision_recall_fscore_support(true, pred, labels=list(labels), average=average,
                                                  zero_division=np.nan)
    return p, r, f1


def cell_metrics(cells, mode: str) -> dict[str, Any]:
    """Precision, recall, F1 per group and overall (micro) and the confusion matrix with background,
    from ``cells.csv`` rows (a DataFrame) at the operating threshold, for ``detector`` or ``pipeline``.

    A missed cell is a true cell predicted as background, a false detection or duplicate a background cell
    predicted as a group, so precision and recall count them (sklearn.metrics over the groups).
    """
    pred = cells[LABEL_COLUMN[mode]].where(cells["detector_label"] != "", BACKGROUND)
    true = cells["true_group"].where(cells["true_group"] != "", BACKGROUND)
    labels = [*GROUPS, BACKGROUND]
    matrix = _confusion(true, pred, labels)
    precision, recall, f1 = _precision_recall_f1(true, pred, GROUPS, average=None)
    per_class = {}
    for k, c in enumerate(GROUPS):
        tp = int(matrix[k, k])
        per_class[c] = {"tp": tp, "fp": int(matrix[:, k].sum()) - tp, "fn": int(matrix[k, :].sum()) - tp,
                        "precision": _score(precision[k]), "recall": _score(recall[k]), "F1": _score(f1[k])}
    micro = _precision_recall_f1(true, pred, GROUPS, average="micro")
    out = {"n_true": int((true != BACKGROUND).sum()), "n_predicted": int((pred != BACKGROUND).sum()),
           "precision": _score(micro[0]), "recall": _score(micro[1]), "F1": _score(micro[2]),
           "per_class": per_class,
           "confusion_matrix": {"labels": labels, "rows": "true", "columns": "predicted",
                                "matrix": matrix.tolist()}}
    if mode == "pipeline":
        out["subtype"] = subtype_metrics(cells)
    return out


def subtype_metrics(cells) -> dict[str, Any]:
    """WBC subtype accuracy, recall per subtype and confusion matrix over the subtyped true WBCs a detection
    matched (any other final label counts as ``other``), from ``cells.csv`` rows."""
    sub = cells[cells["true_subtype"] != ""]
    matched = sub[sub["subtype_outcome"] != "missed"]
    labels = [*SUBTYPES, "other"]
    true = matched["true_subtype"]
    pred = matched["final_label"].where(matched["final_label"].isin(SUBTYPES), "other")
    _, recall, _ = _precision_recall_f1(true, pred, SUBTYPES, average=None)
    return {
        "n_true": len(sub), "n_matched": len(matched),
        "accuracy": _ratio(int((matched["subtype_outcome"] == "correct").sum()), len(matched)),
        "recall": {s: _score(r) for s, r in zip(SUBTYPES, recall)},
        "confusion_matrix": {"labels": labels, "rows": "true", "columns": "predicted",
                             "matrix": _confusion(true, pred, labels).tolist()},
    }


# ---------------------------------------------------------------- images

def image_metrics(images, mode: str) -> dict[str, Any]:
    """Count errors and flag agreement from ``images.csv`` rows (a DataFrame) for ``detector`` or ``pipeline``."""
    ok = images[images["error"] == ""]
    classes = list(GROUPS) + (list(SUBTYPES) if mode == "pipeline" else [])
    missing = ok["labels_missing"].astype(str) if "labels_missing" in ok else None
    mae, rel, bias, n, audited = {}, {}, {}, {}, {}
    for c in classes:
        sel = ok[ok["true_subtypes_known"].astype(bool)] if c in SUBTYPES else ok
        err = sel[f"abs_err_{mode}_{c}"].astype(float)
        diff = sel[f"n_{mode}_{c}"].astype(float) - sel[f"n_true_{c}"].astype(float)
        mae[c] = _mean(err)
        rel[c] = _ratio(float(err.sum()), float(sel[f"n_true_{c}"].sum()))
        bias[c] = _mean(diff)
        n[c] = len(sel)
        if c in GROUPS and missing is not None:
            unboxed = missing[sel.index].str.split(";").map(lambda groups, c=c: c in groups)
            if unboxed.any():
                audited[c] = {"count_MAE": _mean(err[~unboxed]), "n_images": int((~unboxed).sum()),
                              "left_out": sorted(sel.loc[unboxed, "image"])}
    out = {"n_images": len(ok), "count_MAE": mae, "count_rel_err": rel, "count_bias": bias, "n_images_per_class": n,
           "flag_agreement": _mean(ok[f"flags_agree_{mode}"].astype(bool).astype(float))}
    if audited:  # images whose class the audit found unboxed, left out of that class's count error
        out["audited"] = audited
    return out


def set_flags(images, cfg: PipelineConfig) -> dict[str, Any]:
    """Flags from the counts summed over all images (as for one slide), true versus each system."""
    ok = images[images["error"] == ""]
    out: dict[str, Any] = {"n_fields": len(ok)}
    decisive = {}
    for m in ("true", *MODES):
        counts = {c: int(ok[f"n_{m}_{c}"].sum()) if f"n_{m}_{c}" in ok else 0 for c in COUNT_CLASSES}
        decisive[m], every = decisive_flags(counts, max(len(ok), 1), cfg)
        out[m] = {"counts": counts, "flags": every, "decisive_flags": decisive[m]}
    for m in MODES:
        out[f"agree_{m}"] = decisive[m] == decisive["true"]
    return out


# ---------------------------------------------------------------- who made the errors

def attribution(cells) -> dict[str, Any]:
    """Which stage made each error, from the ``outcome`` column of ``cells.csv``."""
    counts = {o: int((cells["outcome"] == o).sum()) for o in OUTCOMES}
    truth = cells[cells["true_group"] != ""]
    extra = cells[cells["true_group"] == ""]
    pipeline_errors = counts["missed"] + counts["false_detection"] + counts["duplicate"] + \
        counts["classifier_broke_correct_detection"] + counts["both_wrong"]
    detector_only = counts["missed"] + counts["false_detection"] + counts["duplicate"]
    sub = cells[cells["true_subtype"] != ""]
    return {
        "outcomes": counts,
        "by_true_class": {g: {o: int((truth[truth["true_group"] == g]["outcome"] == o).sum())
                              for o in OUTCOMES if o not in ("false_detection", "duplicate")} for g in GROUPS},
        "extra_detections_by_predicted_class": {
            g: {o: int((extra[extra["final_group"] == g]["outcome"] == o).sum()) for o in ("false_detection", "duplicate")}
            for g in GROUPS},
        "pipeline_errors": pipeline_errors,
        "share_of_pipeline_errors": {
            "detector (missed, false detection, duplicate)": _ratio(detector_only, pipeline_errors),
            "classifier (broke a correct detection)": _ratio(counts["classifier_broke_correct_detection"],
                                                             pipeline_errors),
            "both (detector wrong, classifier did not fix)": _ratio(counts["both_wrong"], pipeline_errors),
        },
        "classifier_net_effect": counts["detector_wrong_corrected_by_classifier"]
        - counts["classifier_broke_correct_detection"],
        "subtype_outcomes": {o: int((sub["subtype_outcome"] == o).sum()) for o in SUBTYPE_OUTCOMES},
    }
