"""``run_benchmark``: the labelled images of a split, the pipeline run once over them, the tables, the summary."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from smear.configs.errors import SmearError
from smear.configs.paths import git_commit, resolve_path
from smear.data.audit import assign_subtypes, audit_image, missing_wbc_box, wbc_boxed_as_platelets
from smear.data.config import DataConfig
from smear.data.formats import AnnotatedImage, read_source, read_subtypes
from smear.data.images import image_size
from smear.data.splits import assign_splits
from smear.data.taxonomy import group_of

from ..config import PipelineConfig
from ..results import ImageResult
from .matching import IOU_THRESHOLDS, MATCH_IOU, match_image_cells, per_class_true_positives
from .plots import write_plots
from .summary import summarize, summary_markdown, summary_text
from .tables import (
    CELL_COLUMNS,
    DETECTION_COLUMNS,
    LABEL_COLUMN,
    MODES,
    SCORE_COLUMN,
    detection_rows,
    image_row,
    operating,
    write_csv,
)

log = logging.getLogger(__name__)

RANKING_CONF = 0.001


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
        size = image_size(ai.image_path)
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


def rescued_too(cells: Sequence, keep: list[bool], thresholds: dict[str, float], wbc_rescue: float) -> list[bool]:
    """``keep`` with the cells ``smear analyze`` would also keep through ``wbc_rescue``: the WBC candidates of
    :func:`smear.detector.predict.low_wbc_mask` that the classifier put in the WBC group with at least
    ``wbc_rescue`` (``score / detector score``, to the records' 4 decimals)."""
    import numpy as np

    from smear.data.taxonomy import GROUPS
    from smear.detector.predict import Detections, low_wbc_mask

    if wbc_rescue <= 0 or not cells:
        return keep
    det = Detections(np.array([c.box for c in cells], np.float32).reshape(-1, 4),
                     np.array([c.detector["score"] for c in cells], np.float32),
                     np.array([GROUPS.index(c.detector["label"]) for c in cells], np.int64))
    cand = low_wbc_mask(det, np.array(keep, bool), thresholds.get("WBC", 0.0))
    return [k or bool(m and c.group == "WBC" and c.score >= wbc_rescue * float(c.detector["score"]) - 1e-4)
            for c, k, m in zip(cells, keep, cand)]


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
        from ..analyze import Analyzer

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
        keep = rescued_too(res.cells, [operating(c, thresholds) for c in res.cells], thresholds, cfg.wbc_rescue)
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
    write_csv(output / "cells.csv", cell_rows, CELL_COLUMNS)
    write_csv(output / "detections.csv", det_rows, DETECTION_COLUMNS)
    write_csv(output / "images.csv", image_rows, image_columns)

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

