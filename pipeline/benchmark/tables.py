"""The benchmark's tables: their columns and outcome names, the rows of ``images.csv`` and ``detections.csv``,
and reading and writing the CSVs (``cells.csv`` rows come from :func:`~.matching.match_image_cells`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from smear.data.taxonomy import GROUPS, SUBTYPES

from ..config import PipelineConfig
from ..flags import compute_flags
from ..results import Cell, count_cells, differential_from_counts

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
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
COUNT_CLASSES = (*GROUPS, *SUBTYPES)
CELL_COLUMNS = ("image", *(f"true_{k}" for k in BOX_COLUMNS), "true_group", "true_subtype",
                *(f"pred_{k}" for k in BOX_COLUMNS), "iou", "detector_label", "detector_score", "classifier_label",
                "classifier_score", "final_group", "final_label", "score", "outcome", "subtype_outcome")
DETECTION_COLUMNS = ("image", *(f"pred_{k}" for k in BOX_COLUMNS), "detector_label", "detector_score",
                     "classifier_label", "classifier_score", "final_group", "final_label", "score", "operating",
                     "tp50_detector", "tp50_pipeline")
TEXT_COLUMNS = ("image", "true_group", "true_subtype", "detector_label", "classifier_label", "final_group",
                "final_label", "outcome", "subtype_outcome", "error", "flags_true", "flags_detector", "flags_pipeline",
                "flags_all_true", "flags_all_detector", "flags_all_pipeline", "labels_missing")


def round_or_blank(v: float | None, nd: int = 4) -> float | str:
    """A table value: ``v`` rounded to ``nd`` decimals, or an empty cell for None."""
    return "" if v is None else round(float(v), nd)


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


def decisive_flags(counts: dict[str, int], n_fields: int, cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """Flag names raised with a severity other than 'insufficient evidence', and all flags as 'name (severity)'."""
    flags = compute_flags(counts, differential_from_counts(counts), n_fields, cfg)
    return (sorted({f.name for f in flags if f.severity != "insufficient evidence"}),
            [f"{f.name} ({f.severity})" for f in flags])


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
        decisive[m], every = decisive_flags(counts[m], 1, cfg)
        out[f"flags_{m}"] = ";".join(decisive[m])
        out[f"flags_all_{m}"] = "; ".join(every)
    for m in MODES:
        out[f"flags_agree_{m}"] = decisive[m] == decisive["true"]
    for o in OUTCOMES:
        out[f"n_{o}"] = sum(r["outcome"] == o for r in rows)
    return out


def detection_rows(image: str, cells: Sequence[Cell], kept: Sequence[bool]) -> list[dict[str, Any]]:
    """``detections.csv`` rows: every candidate cell of the low-threshold run, ``kept`` saying which the
    operating thresholds keep (tp50 columns filled later)."""
    out = []
    for c, keep in zip(cells, kept):
        r: dict[str, Any] = {"image": image}
        r.update({f"pred_{k}": round(float(v), 1) for k, v in zip(BOX_COLUMNS, c.box)})
        r.update({"detector_label": c.detector["label"], "detector_score": round_or_blank(c.detector["score"]),
                  "classifier_label": c.classifier.get("label", ""),
                  "classifier_score": round_or_blank(c.classifier.get("score")),
                  "final_group": c.group, "final_label": c.label, "score": round_or_blank(c.score),
                  "operating": keep})
        out.append(r)
    return out


def write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """One table: a header of ``columns``, then one line per row."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def read_tables(output: Path, text: Sequence[str] = TEXT_COLUMNS):
    """``cells.csv``, ``detections.csv`` and ``images.csv`` as DataFrames, empty text cells as ''."""
    import pandas as pd

    def load(name: str):
        df = pd.read_csv(Path(output) / name, keep_default_na=False, na_values=[])
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

    return load("cells.csv"), load("detections.csv"), load("images.csv")


def operating(cell: Cell, thresholds: Mapping[str, float]) -> bool:
    """Whether a candidate of the low-threshold run is kept at the operating thresholds (by detector group)."""
    return float(cell.detector["score"]) >= thresholds.get(cell.detector["label"], 0.0)
