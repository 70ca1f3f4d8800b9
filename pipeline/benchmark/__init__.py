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
  (``PipelineConfig().thresholds()``: ``conf``, or a class's own ``class_conf``, on the detector's group).
  Class-agnostic matching pairs them; the outcome says which stage was right (see :data:`OUTCOMES`).
- ``images.csv``: one row per image, counts built from the ``cells.csv`` rows, count errors,
  and the flags raised from true versus predicted counts.
- ``summary.json`` / ``summary.md``: computed by reading the three CSVs back.

Filtering the low-threshold run by detector score gives exactly what ``smear analyze`` returns
at the operating threshold: greedy NMS only lets a higher-scoring box suppress a lower one, so
the surviving boxes above any threshold do not depend on the threshold the detector ran at. The WBCs
``smear analyze`` keeps under the threshold on the classifier's word (``wbc_rescue``) are kept the same
way (``run.rescued_too``), up to the records' rounding of the classifier's probability.

Modules: ``tables`` (columns, rows, CSV in and out), ``matching`` (greedy matching of predictions to truth),
``metrics`` (AP, cell and image figures), ``summary`` (the summary from the tables, ``summary.md``, printed
lines), ``plots`` and ``run`` (``run_benchmark``, ``load_ground_truth``).
"""

from .matching import IOU_THRESHOLDS, MATCH_IOU, match_greedy, match_image_cells, per_class_true_positives
from .metrics import (
    ap_metrics,
    attribution,
    average_precision,
    cell_metrics,
    detection_ap,
    image_metrics,
    set_flags,
    subtype_metrics,
)
from .plots import write_plots
from .run import RANKING_CONF, load_ground_truth, run_benchmark
from .summary import BCCD_NOTE, summarize, summary_markdown, summary_text
from .tables import (
    CELL_COLUMNS,
    DETECTION_COLUMNS,
    MODES,
    OUTCOMES,
    SUBTYPE_OUTCOMES,
    detection_rows,
    image_row,
    operating,
    read_tables,
)

__all__ = ["OUTCOMES", "SUBTYPE_OUTCOMES", "MODES", "MATCH_IOU", "IOU_THRESHOLDS", "RANKING_CONF", "BCCD_NOTE",
           "CELL_COLUMNS", "DETECTION_COLUMNS", "run_benchmark", "load_ground_truth", "summarize", "summary_markdown",
           "summary_text", "write_plots", "read_tables", "match_greedy", "match_image_cells",
           "per_class_true_positives", "average_precision", "detection_ap", "ap_metrics", "cell_metrics",
           "subtype_metrics", "image_metrics", "set_flags", "attribution", "image_row", "detection_rows", "operating"]
