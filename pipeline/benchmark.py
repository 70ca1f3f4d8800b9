"""Benchmark the pipeline on labelled fields: cell level, image level, and who made each error.

``run_benchmark`` runs the full pipeline once at a low detector threshold (0.001) to get the
whole ranked list of candidate cells, then scores two systems on the same boxes:

- **detector**: each cell's detector group and detector score (the detector alone);
- **pipeline**: the final merged group and score (detector + classifier).

Tables first, summaries from the tables (house style, rule 11):

- ``detections.csv``: every candidate cell at conf >= 0.001 with both opinions and whether it is
  a true positive at IoU 0.5 (per-class matching); mAP50 and mAP50-95 come from it and the
  ground-truth rows of ``cells.csv``.
- ``cells.csv``: one row per ground-truth cell or predicted cell at the operating thresholds
  (``PipelineConfig().thresholds()``: ``conf``, or a class's own ``class_conf``, on the detector's group). Class-agnostic matching pairs them; the outcome says which
  stage was right (see :data:`OUTCOMES`).
- ``images.csv``: one row per image, counts built from the ``cells.csv`` rows, count errors,
  and the flags raised from true versus predicted counts.
- ``summary.json`` / ``summary.md``: computed by reading the three CSVs back.

Filtering the low-threshold run by detector score gives exactly what ``smear analyze`` returns
at the operating threshold: greedy NMS only lets a higher-scoring box suppress a lower one, so
the surviving boxes above any threshold do not depend on the threshold the detector ran at.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from smear.configs.errors import SmearError
from smear.configs.paths import git_commit, resolve_path
from smear.data.audit import assign_subtypes, audit_image, missing_wbc_box, wbc_boxed_as_platelets
from smear.data.boxes import iou_matrix
from smear.data.config import DataConfig
from smear.data.formats import AnnotatedImage, read_source, read_subtypes
from smear.data.splits import assign_splits
from smear.data.taxonomy import GROUPS, SUBTYPES, group_of

from .config import PipelineConfig
from .flags import compute_flags
from .results import Cell, ImageResult, count_cells, differential_from_counts

log = logging.getLogger(__name__)

OUTCOMES = (
    "correct",  # matched, final group right, detector group right
    "missed",  # a true cell no detection matched (a detector error)
    "false_detection",  # a detection overlapping no true cell at IoU >= 0.5
    "detector_wrong_corrected_by_classifier",  # matched; detector group wrong, final group right
    "classifier_broke_correct_detection",  # matched; detector group right, final group wrong
    "both_wrong",  # matched; detector group wrong and final group wrong
    "duplicate",  # a second detection of a true cell already matched
)
SUBTYPE_OUTCOMES = ("correct", "wrong_subtype", "wrong_group", "missed")
MODES = ("detector", "pipeline")
LABEL_COLUMN = {"detector": "detector_label", "pipeline": "final_group"}
SCORE_COLUMN = {"detector": "detector_score", "pipeline": "score"}
MATCH_IOU = 0.5
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RANKING_CONF = 0.001
BACKGROUND = "background"
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
BCCD_NOTE = ("BCCD labels are incomplete for RBCs (many RBCs, mostly at the border and in clumps, carry no box), so "
             "some correct RBC detections count as false detections: RBC precision, RBC AP and RBC count errors "
             "understate the models.")


# ---------------------------------------------------------------- matching and AP



def match_greedy(pred_scores: Sequence[float], ious: np.ndarray, iou_threshold: float = MATCH_IOU) -> np.ndarray:
    """One-to-one matching, highest score first (COCO): each prediction takes the unmatched true box
    it overlaps most, if that IoU is >= ``iou_threshold``.

    Args:
        pred_scores: (N,) prediction scores.
        ious: (N, M) IoU of predictions with true boxes (see :func:`iou_matrix`).

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


def average_precision(scores: Sequence[float], true_positive: Sequence[bool], n_true: int) -> float | None:
    """COCO average precision: mean interpolated precision at 101 recall points (0, 0.01, ..., 1).

    Precision at recall r is the highest precision at any recall >= r; recall levels never
    reached count as precision 0. ``None`` when there are no true cells of the class.

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


# ---------------------------------------------------------------- cell rows

def _round(v: float | None, nd: int = 4) -> float | str:
    return "" if v is None else round(float(v), nd)


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
        r["iou"] = _round(best)
        r["detector_label"] = c.detector["label"] if c else ""
        r["detector_score"] = _round(c.detector["score"]) if c else ""
        r["classifier_label"] = c.classifier.get("label", "") if c else ""
        r["classifier_score"] = _round(c.classifier.get("score")) if c else ""
        r["final_group"] = c.group if c else ""
        r["final_label"] = c.label if c else ""
        r["score"] = _round(c.score) if c else ""
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


def _row_cells(rows: Iterable[dict], mode: str) -> list[Cell]:
    """Cells as ``count_cells`` sees them, from ``cells.csv`` rows: ``true``, ``detector`` or ``pipeline``."""
    out = []
    for r in rows:
        if mode == "true":
            if not r["true_group"]:
                continue
            group, label = r["true_group"], r["true_subtype"] or r["true_group"]
        elif not r["detector_label"]:
            continue
        elif mode == "detector":
            group = label = r["detector_label"]
        else:
            group, label = r["final_group"], r["final_label"]
        out.append(Cell(box=[], group=group, label=label, score=1.0, detector={}, classifier={}))
    return out


def _decisive_flags(counts: dict[str, int], n_fields: int, cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """Flag names raised with a severity other than 'insufficient evidence', and all flags as 'name (severity)'."""
    flags = compute_flags(counts, differential_from_counts(counts), n_fields, cfg)
    return (sorted({f.name for f in flags if f.severity != "insufficient evidence"}),
            [f"{f.name} ({f.severity})" for f in flags])


COUNT_CLASSES = (*GROUPS, *SUBTYPES)


def image_row(image: str, rows: Sequence[dict], cfg: PipelineConfig, error: str = "",
              missing: Sequence[str] = ()) -> dict[str, Any]:
    """``images.csv`` row of one image, built from its ``cells.csv`` rows.

    ``missing``: groups whose boxes the audit found missing or wrong on the image (``labels_missing``); the
    audited count errors leave the image out for those groups.
    """
    out: dict[str, Any] = {"image": image, "error": error, "labels_missing": ";".join(missing)}
    counts = {m: count_cells(_row_cells(rows, m)) for m in ("true", "detector", "pipeline")}
    for c in COUNT_CLASSES:
        out[f"n_true_{c}"] = counts["true"][c]
        if c in GROUPS:
            out[f"n_detector_{c}"] = counts["detector"][c]
        out[f"n_pipeline_{c}"] = counts["pipeline"][c]
    for c in COUNT_CLASSES:
        if c in GROUPS:
            out[f"abs_err_detector_{c}"] = abs(counts["detector"][c] - counts["true"][c])
        out[f"abs_err_pipeline_{c}"] = abs(counts["pipeline"][c] - counts["true"][c])
    n_wbc = counts["true"]["WBC"]
    out["true_subtypes_known"] = n_wbc > 0 and sum(counts["true"][s] for s in SUBTYPES) == n_wbc
    decisive = {}
    for m in ("true", "detector", "pipeline"):
        decisive[m], every = _decisive_flags(counts[m], 1, cfg)
        out[f"flags_{m}"] = ";".join(decisive[m])
        out[f"flags_all_{m}"] = "; ".join(every)
    for m in MODES:
        out[f"flags_agree_{m}"] = decisive[m] == decisive["true"]
    for o in OUTCOMES:
        out[f"n_{o}"] = sum(r["outcome"] == o for r in rows)
    return out


def operating(cell: Cell, thresholds: Mapping[str, float]) -> bool:
    """Whether a candidate of the low-threshold run is kept at the operating thresholds (by detector group)."""
    return float(cell.detector["score"]) >= thresholds.get(cell.detector["label"], 0.0)


def detection_rows(image: str, cells: Sequence[Cell], kept: Sequence[bool]) -> list[dict[str, Any]]:
    """``detections.csv`` rows: every candidate cell of the low-threshold run, ``kept`` saying which the
    operating thresholds keep (tp50 columns filled later)."""
    out = []
    for c, keep in zip(cells, kept):
        r: dict[str, Any] = {"image": image}
        r.update({f"pred_{k}": round(float(v), 1) for k, v in zip(BOX_COLUMNS, c.box)})
        r.update({"detector_label": c.detector["label"], "detector_score": _round(c.detector["score"]),
                  "classifier_label": c.classifier.get("label", ""),
                  "classifier_score": _round(c.classifier.get("score")),
                  "final_group": c.group, "final_label": c.label, "score": _round(c.score),
                  "operating": keep})
        out.append(r)
    return out


# ---------------------------------------------------------------- summaries (from the tables)

def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _mean(values: Iterable[float]) -> float | None:
    v = [float(x) for x in values]
    return round(float(np.mean(v)), 4) if v else None


def cell_metrics(cells, mode: str) -> dict[str, Any]:
    """Precision, recall, F1 per group and overall (micro) and the confusion matrix with background,
    from ``cells.csv`` rows (a DataFrame) at the operating threshold, for ``detector`` or ``pipeline``."""
    pred = cells[LABEL_COLUMN[mode]].where(cells["detector_label"] != "", BACKGROUND)
    true = cells["true_group"].where(cells["true_group"] != "", BACKGROUND)
    labels = [*GROUPS, BACKGROUND]
    matrix = [[int(((true == t) & (pred == p)).sum()) for p in labels] for t in labels]
    m = np.array(matrix)
    per_class = {}
    for k, c in enumerate(GROUPS):
        tp, fp, fn = int(m[k, k]), int(m[:, k].sum() - m[k, k]), int(m[k, :].sum() - m[k, k])
        p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_class[c] = {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r,
                        "F1": _ratio(2 * tp, 2 * tp + fp + fn)}
    tp = sum(v["tp"] for v in per_class.values())
    fp = sum(v["fp"] for v in per_class.values())
    fn = sum(v["fn"] for v in per_class.values())
    out = {"n_true": int((true != BACKGROUND).sum()), "n_predicted": int((pred != BACKGROUND).sum()),
           "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "F1": _ratio(2 * tp, 2 * tp + fp + fn),
           "per_class": per_class,
           "confusion_matrix": {"labels": labels, "rows": "true", "columns": "predicted", "matrix": matrix}}
    if mode == "pipeline":
        sub = cells[cells["true_subtype"] != ""]
        matched = sub[sub["subtype_outcome"] != "missed"]
        labels_s = [*SUBTYPES, "other"]
        pred_s = matched["final_label"].where(matched["final_label"].isin(SUBTYPES), "other")
        out["subtype"] = {
            "n_true": len(sub), "n_matched": len(matched),
            "accuracy": _ratio(int((matched["subtype_outcome"] == "correct").sum()), len(matched)),
            "recall": {s: _ratio(int(((matched["true_subtype"] == s) & (pred_s == s)).sum()),
                                 int((matched["true_subtype"] == s).sum())) for s in SUBTYPES},
            "confusion_matrix": {"labels": labels_s, "rows": "true", "columns": "predicted",
                                 "matrix": [[int(((matched["true_subtype"] == t) & (pred_s == p)).sum())
                                             for p in labels_s] for t in labels_s]},
        }
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
        decisive[m], every = _decisive_flags(counts, max(len(ok), 1), cfg)
        out[m] = {"counts": counts, "flags": every, "decisive_flags": decisive[m]}
    for m in MODES:
        out[f"agree_{m}"] = decisive[m] == decisive["true"]
    return out


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


def read_tables(output: Path):
    """``cells.csv``, ``detections.csv`` and ``images.csv`` as DataFrames, empty text cells as ''."""
    import pandas as pd

    def load(name: str, text: Sequence[str]):
        df = pd.read_csv(output / name, keep_default_na=False, na_values=[])
        for col in df.columns:
            if col in text or df[col].dtype != object:
                continue
            values = set(df[col]) - {""}
            if values <= {"True", "False"}:  # a boolean column with blanks (rows of failed images)
                df[col] = df[col].map({"True": True, "False": False, "": False}).astype(bool)
            else:
                df[col] = pd.to_numeric(df[col].replace("", np.nan))
        for col in text:
            if col in df:
                df[col] = df[col].astype(str)
        return df

    text = ("image", "true_group", "true_subtype", "detector_label", "classifier_label", "final_group",
            "final_label", "outcome", "subtype_outcome", "error", "flags_true", "flags_detector", "flags_pipeline",
            "flags_all_true", "flags_all_detector", "flags_all_pipeline", "labels_missing")
    return load("cells.csv", text), load("detections.csv", text), load("images.csv", text)


def summarize(output: Path, cfg: PipelineConfig | None = None) -> dict[str, Any]:
    """The benchmark summary, computed only from the CSV tables in ``output``."""
    cfg = cfg or PipelineConfig()
    cells, detections, images = read_tables(Path(output))
    summary: dict[str, Any] = {"cell": {}, "image": {}}
    for m in MODES:
        summary["cell"][m] = {**ap_metrics(detections, cells, m), **cell_metrics(cells, m)}
        summary["image"][m] = image_metrics(images, m)
    summary["image"]["set_flags"] = set_flags(images, cfg)
    summary["attribution"] = attribution(cells)
    return summary


# ---------------------------------------------------------------- data and run

def load_ground_truth(data: Path | None, split: str,
                      data_cfg: DataConfig | None = None) -> tuple[Path, list[AnnotatedImage]]:
    """The labelled images of ``split`` (or ``all``), audited like training data, with BCCD subtypes.

    Boxes get the fixes ``smear data prepare`` applies (clipped, tiny and duplicate boxes dropped),
    and WBCs the subtype of ``data_cfg.subtypes_csv`` where it is unambiguous (else plain WBC).
    """
    cfg = data_cfg or DataConfig()
    source = Path(data) if data is not None else resolve_path(cfg.source)
    images = read_source(source)
    if split != "all":
        assign_splits(images, cfg)  # same deterministic split as 'smear data prepare' for unsplit sources
        available = sorted({a.split for a in images if a.split})
        images = [a for a in images if a.split == split]
        if not images:
            raise SmearError(f"{source}: no images in split '{split}'; available splits: "
                             f"{', '.join(available) or 'none'} (or 'all')")
    subtypes_csv = resolve_path(cfg.subtypes_csv) if cfg.subtypes_csv else None
    subtypes = read_subtypes(subtypes_csv) if subtypes_csv and subtypes_csv.is_file() else {}
    for ai in images:
        size = _image_size(ai.image_path)
        if size and size != (ai.width, ai.height):
            ai.width, ai.height = size  # the image wins, as in 'smear data prepare'
        audit_image(ai, cfg)
        if subtypes:
            assign_subtypes(ai, subtypes)
            if missing_wbc_box(ai, subtypes):
                ai.missing.append("WBC")
                if wbc_boxed_as_platelets(ai)[0]:
                    ai.missing.append("Platelets")  # its platelet count holds the WBC: wrong, left out too
    return source, images


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001  unreadable files are reported by the analyzer
        return None


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


CELL_COLUMNS = ("image", *(f"true_{k}" for k in BOX_COLUMNS), "true_group", "true_subtype",
                *(f"pred_{k}" for k in BOX_COLUMNS), "iou", "detector_label", "detector_score", "classifier_label",
                "classifier_score", "final_group", "final_label", "score", "outcome", "subtype_outcome")
DETECTION_COLUMNS = ("image", *(f"pred_{k}" for k in BOX_COLUMNS), "detector_label", "detector_score",
                     "classifier_label", "classifier_score", "final_group", "final_label", "score", "operating",
                     "tp50_detector", "tp50_pipeline")


def run_benchmark(data: Path | None, split: str, output: Path, analyzer=None, cfg: PipelineConfig | None = None,
                  data_cfg: DataConfig | None = None) -> str:
    """Score detector and pipeline on a labelled split; write tables, summary and plots to ``output``.

    Args:
        data: VOC folder, YOLO data.yaml or COCO json; None for BCCD (``DataConfig().source``).
        split: ``train``, ``val``, ``test`` or ``all``.
        output: folder for ``cells.csv``, ``detections.csv``, ``images.csv``, ``summary.json``/``.md`` and plots.
        analyzer: anything with ``analyze_images(paths, progress=...) -> list[ImageResult]`` run at a low
            threshold; by default an :class:`~smear.pipeline.analyze.Analyzer` at conf 0.001.
        cfg: pipeline settings: ``thresholds()`` are the operating thresholds, the rest decides flags and the
            models of the default analyzer.
        data_cfg: how ground truth is audited and where WBC subtypes come from (``DataConfig()``).

    Returns:
        A short human-readable summary.

    Example:
        >>> print(run_benchmark(None, "test", Path("runs/benchmark/bccd-test")))
    """
    cfg = cfg or PipelineConfig()
    output = Path(output)
    source, truth = load_ground_truth(data, split, data_cfg)
    if analyzer is None:
        from .analyze import Analyzer

        analyzer = Analyzer(cfg.one_threshold(RANKING_CONF))
    info = getattr(getattr(analyzer, "detector", None), "info", None)  # absent on a stand-in analyzer
    cfg = cfg.for_detector(getattr(info, "card", None))  # the analyzer ranks; these thresholds operate
    thresholds = cfg.thresholds()
    acfg = getattr(analyzer, "cfg", None)
    ran_at = max(acfg.thresholds().values()) if isinstance(acfg, PipelineConfig) else RANKING_CONF
    if ran_at > 0.01:
        log.warning("the analyzer runs at conf %.3g: mAP only sees that part of the ranked list", ran_at)
    log.info("benchmark: %d %s images from %s", len(truth), split, source)
    results: list[ImageResult] = analyzer.analyze_images([a.image_path for a in truth], progress=True)
    if len(results) != len(truth):
        raise SmearError(f"the analyzer returned {len(results)} results for {len(truth)} images")

    cell_rows: list[dict] = []
    det_rows: list[dict] = []
    image_rows: list[dict] = []
    for ai, res in zip(truth, results):
        if res.error:
            log.warning("%s: %s (image left out of the benchmark)", ai.image_id, res.error)
            image_rows.append({"image": ai.image_id, "error": res.error})
            continue
        keep = [operating(c, thresholds) for c in res.cells]
        kept = [c for c, k in zip(res.cells, keep) if k]
        rows = match_image_cells(ai.image_id, [(b.xyxy, b.label) for b in ai.boxes], kept)
        cell_rows.extend(rows)
        image_rows.append(image_row(ai.image_id, rows, cfg, missing=ai.missing))
        dets = detection_rows(ai.image_id, res.cells, keep)
        for mode in MODES:
            tp = per_class_true_positives([ai.image_id] * len(res.cells), [c.box for c in res.cells],
                                          [d[LABEL_COLUMN[mode]] for d in dets], [d[SCORE_COLUMN[mode]] for d in dets],
                                          [ai.image_id] * len(ai.boxes), [b.xyxy for b in ai.boxes],
                                          [group_of(b.label) for b in ai.boxes], thresholds=(MATCH_IOU,))
            for d, t in zip(dets, tp[:, 0]):
                d[f"tp50_{mode}"] = bool(t)
        det_rows.extend(dets)
    if not cell_rows and not det_rows and all(r.get("error") for r in image_rows):
        raise SmearError(f"none of the {len(truth)} images of split '{split}' could be analysed")

    output.mkdir(parents=True, exist_ok=True)
    image_columns = list(dict.fromkeys(k for r in image_rows if not r.get("error") for k in r)) or ["image", "error"]
    _write_csv(output / "cells.csv", cell_rows, CELL_COLUMNS)
    _write_csv(output / "detections.csv", det_rows, DETECTION_COLUMNS)
    _write_csv(output / "images.csv", image_rows, image_columns)

    summary = summarize(output, cfg)
    summary["run"] = {
        "data": str(source), "split": split, "n_images": len(truth),
        "n_failed": sum(1 for r in image_rows if r.get("error")), "operating_conf": cfg.conf,
        "operating_thresholds": thresholds,
        "ranking_conf": ran_at, "match_iou": MATCH_IOU, "iou_thresholds": list(IOU_THRESHOLDS),
        "ap": "COCO 101-point interpolated AP, per-class greedy matching by score",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "models": _models(analyzer), "bccd_rbc_labels_incomplete": _is_bccd(source, truth),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "summary.md").write_text(summary_markdown(summary))
    try:
        write_plots(output, summary)
    except Exception as e:  # noqa: BLE001  plots are a view; the tables and summary stand without them
        log.warning("plots not written: %s", e)
    return summary_text(summary, output)


def _models(analyzer) -> dict[str, Any]:
    try:
        info = analyzer.info()
        return {k: {"weights": v.get("weights"), "date": v.get("date"), "commit": v.get("commit")}
                for k, v in info.items() if isinstance(v, dict)}
    except Exception:  # noqa: BLE001  a stand-in analyzer without model cards
        return {}


def _is_bccd(source: Path, truth: Sequence[AnnotatedImage]) -> bool:
    return "bccd" in str(source).lower() or any(a.image_id.startswith("BloodImage_") for a in truth)


# ---------------------------------------------------------------- views

def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _conf_text(run: Mapping[str, Any]) -> str:
    """The operating threshold as text: ``0.4``, or ``0.4 (Platelets 0.55)`` where a class has its own."""
    conf = run.get("operating_conf", "")
    own = {g: t for g, t in (run.get("operating_thresholds") or {}).items() if t != conf}
    return f"{conf}" + (" (" + ", ".join(f"{g} {t:g}" for g, t in own.items()) + ")" if own else "")


def summary_markdown(s: dict[str, Any]) -> str:
    """``summary.md``: the summary as tables, with the caveats that go with them."""
    run = s.get("run", {})
    cd, cp = s["cell"]["detector"], s["cell"]["pipeline"]
    idt, ipl = s["image"]["detector"], s["image"]["pipeline"]
    lines = [f"# smear benchmark: {run.get('split', '')} split", "",
             f"Data: `{run.get('data', '')}`; {run.get('n_images', '')} images ({run.get('n_failed', 0)} failed); "
             f"operating conf {_conf_text(run)}, ranked list from conf {run.get('ranking_conf', '')}; "
             f"commit {run.get('commit', '')}.", ""]
    lines += ["Every figure below is computed from `cells.csv`, `detections.csv` and `images.csv` in this folder.",
              "*detector* = the detector's own group and score; *pipeline* = the final merged group and score.", ""]
    if run.get("bccd_rbc_labels_incomplete", True):
        lines += [f"**Note:** {BCCD_NOTE}", ""]
    lines += ["## Cells", "", "| metric | detector | pipeline |", "|---|---|---|"]
    for k in ("mAP50", "mAP50_95", "precision", "recall", "F1"):
        lines.append(f"| {k} | {_fmt(cd[k])} | {_fmt(cp[k])} |")
    for g in GROUPS:
        for k in ("AP50", "AP50_95"):
            lines.append(f"| {k} {g} | {_fmt(cd[k][g])} | {_fmt(cp[k][g])} |")
        for k in ("precision", "recall", "F1"):
            lines.append(f"| {k} {g} | {_fmt(cd['per_class'][g][k])} | {_fmt(cp['per_class'][g][k])} |")
    sub = cp.get("subtype", {})
    if sub.get("n_true"):
        lines += ["", f"WBC subtype (pipeline, {sub['n_matched']} of {sub['n_true']} subtyped WBCs matched): "
                      f"accuracy {_fmt(sub['accuracy'])}; recall "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in sub["recall"].items())]
    lines += ["", "## Who made the errors (operating conf, class-agnostic matching at IoU 0.5)", "",
              "| outcome | cells |", "|---|---|"]
    att = s["attribution"]
    lines += [f"| {o} | {n} |" for o, n in att["outcomes"].items()]
    lines += ["", "| share of pipeline errors | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in att["share_of_pipeline_errors"].items()]
    lines += ["", f"Classifier net effect on group calls: {att['classifier_net_effect']:+d} cells "
                  "(detector errors it corrected minus correct detections it broke).", ""]
    lines += ["## Images", "", "| class | MAE detector | MAE pipeline | rel. error detector | rel. error pipeline |",
              "|---|---|---|---|---|"]
    for c in (*GROUPS, *SUBTYPES):
        lines.append(f"| {c} | {_fmt(idt['count_MAE'].get(c))} | {_fmt(ipl['count_MAE'].get(c))} | "
                     f"{_fmt(idt['count_rel_err'].get(c))} | {_fmt(ipl['count_rel_err'].get(c))} |")
    sf = s["image"]["set_flags"]
    lines += ["", f"Flag agreement per image (same decisive flags as from the true counts): detector "
                  f"{_fmt(idt['flag_agreement'])}, pipeline {_fmt(ipl['flag_agreement'])}. Single fields rarely "
                  "hold enough cells for a decisive flag, so most per-image flags are 'insufficient evidence'.",
              "", f"Flags over all {sf['n_fields']} fields together: true "
                  f"{', '.join(sf['true']['flags']) or 'none'}; detector {', '.join(sf['detector']['flags']) or 'none'}; "
                  f"pipeline {', '.join(sf['pipeline']['flags']) or 'none'}.",
              "", "Subtype count errors use only images where every true WBC has a known subtype.", ""]
    for g, a in ipl.get("audited", {}).items():
        lines[-1:] = [f"Audited labels: the data audit found {len(a['left_out'])} image(s) whose {g} boxes are "
                      f"missing or wrong (a WBC without its box, or boxed as a platelet); without them the {g} count "
                      f"MAE is detector "
                      f"{_fmt(idt.get('audited', {}).get(g, {}).get('count_MAE'))}, pipeline {_fmt(a['count_MAE'])} "
                      f"({a['n_images']} images). Left out: {', '.join(a['left_out'])}.", ""]
    return "\n".join(lines)


def summary_text(s: dict[str, Any], output: Path) -> str:
    """The few lines ``smear benchmark`` prints."""
    run = s.get("run", {})
    cd, cp = s["cell"]["detector"], s["cell"]["pipeline"]
    att = s["attribution"]
    mae = s["image"]["pipeline"]["count_MAE"]
    lines = [f"benchmark: {run.get('n_images')} {run.get('split')} images, {cp['n_true']} true cells, "
             f"operating conf {_conf_text(run)}",
             f"  mAP50     detector {_fmt(cd['mAP50'])}  pipeline {_fmt(cp['mAP50'])}",
             f"  mAP50-95  detector {_fmt(cd['mAP50_95'])}  pipeline {_fmt(cp['mAP50_95'])}",
             f"  F1        detector {_fmt(cd['F1'])}  pipeline {_fmt(cp['F1'])}",
             "  count MAE per image (pipeline): " + ", ".join(f"{g} {_fmt(mae[g])}" for g in GROUPS),
             *(f"  count MAE {g}, audited labels: {_fmt(a['count_MAE'])} ({len(a['left_out'])} image(s) whose "
               f"{g} boxes are missing or wrong left out: {', '.join(a['left_out'])})"
               for g, a in s["image"]["pipeline"].get("audited", {}).items()),
             f"  flag agreement per image: pipeline {_fmt(s['image']['pipeline']['flag_agreement'])}",
             "  outcomes: " + ", ".join(f"{k} {v}" for k, v in att["outcomes"].items()),
             f"  classifier net effect: {att['classifier_net_effect']:+d} cells"]
    if run.get("bccd_rbc_labels_incomplete"):
        lines.append("  note: BCCD RBC labels are incomplete; unlabelled RBCs count as false detections")
    lines.append(f"  written to {output}/ (cells.csv, detections.csv, images.csv, summary.json, summary.md, plots)")
    return "\n".join(lines)


def write_plots(output: Path, s: dict[str, Any]) -> None:
    """Confusion matrices, outcomes per class, and predicted-vs-true counts per class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smear.classifier.evaluate import plot_confusion

    for m in MODES:
        plot_confusion(s["cell"][m]["confusion_matrix"], output / f"confusion_matrix_{m}.png",
                       f"{m}: rows true, columns predicted")
    sub = s["cell"]["pipeline"].get("subtype", {})
    if sub.get("n_matched"):
        plot_confusion(sub["confusion_matrix"], output / "confusion_matrix_subtypes.png", "pipeline: WBC subtypes")

    att = s["attribution"]
    kinds = [o for o in OUTCOMES if o != "correct"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(GROUPS))
    for o in kinds:
        vals = np.array([att["by_true_class"][g].get(o, 0) + att["extra_detections_by_predicted_class"][g].get(o, 0)
                         for g in GROUPS], dtype=float)
        ax.bar(GROUPS, vals, bottom=bottom, label=o.replace("_", " "))
        bottom += vals
    ax.set_ylabel("cells")
    ax.set_title("errors per class (true class; predicted class for false detections and duplicates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "errors_per_class.png", dpi=110)
    plt.close(fig)

    _, _, images = read_tables(output)
    images = images[images["error"] == ""]
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 4))
    for ax, g in zip(np.atleast_1d(axes), GROUPS):
        t = images[f"n_true_{g}"].astype(float)
        hi = 1.0
        for m, marker in (("detector", "x"), ("pipeline", "o")):
            p = images[f"n_{m}_{g}"].astype(float)
            ax.scatter(t, p, marker=marker, alpha=0.6, label=m, facecolors="none" if marker == "o" else None,
                       edgecolors="C1" if marker == "o" else None)
            hi = max(hi, float(p.max()) if len(p) else 0.0)
        hi = max(hi, float(t.max()) if len(t) else 0.0) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel(f"true {g} per image")
        ax.set_ylabel(f"predicted {g} per image")
        ax.set_title(g)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "counts_scatter.png", dpi=110)
    plt.close(fig)


__all__ = ["OUTCOMES", "run_benchmark", "summarize", "match_greedy", "iou_matrix", "average_precision",
           "match_image_cells", "detection_ap", "load_ground_truth"]
