"""Count quality: how completely the RBCs of a field were found, before any flag rests on the RBC count.

A ratio flag (platelets or WBCs per 1,000 RBC, RBC size) is only as good as the RBC count under it:
missing half the RBCs doubles the platelet:RBC ratio. ``rbc_coverage`` is the share of the field's
red-cell pixels (cell pixels outside WBC and platelet boxes) that RBC boxes cover. Measured on the
complete-label val fields (2026-12-01, runs/tools-style probe over 57 BCCD, 67 PBC, 76 Raabin fields):
complete labels cover a median 0.95 / 0.99 / 0.98 (10th percentile 0.87 / 0.98 / 0.95); the first-round
detector, which misses touching RBCs and counts 28-32% too few, covers 0.80 / 0.88 / 0.71 (10th percentile
0.58 / 0.74 / 0.26), and per field its coverage follows its RBC count ratio (correlation 0.79-0.90).
"""

from __future__ import annotations

from smear.detector.coverage import rbc_coverage

__all__ = ["MIN_RBC_COVERAGE", "rbc_coverage"]

#: below this share of a slide's red-cell pixels covered by RBC boxes, flags that rest on the RBC count say
#: "insufficient evidence": under the complete labels' 10th percentile on BCCD (0.87), above the median of
#: the detector that misses touching cells (0.80 on BCCD)
MIN_RBC_COVERAGE = 0.85
