"""``smear classifier adapt --fields``: the subtype stage's batch-norm statistics from a lab's own unlabelled fields.

The detector finds the WBCs of the fields (``scale="auto"``, its operating thresholds); the classifier's subtype
stage re-estimates the statistics of its trained batch-norm layers on their crops (AdaBN,
:func:`smear.classifier.adapt.recalibrate_batchnorm`); the base cascade is written again with that stage. It lives
here, above the detector and the classifier, because it needs both.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from smear.classifier.adapt import ADAPT_BASE, recalibrate_batchnorm, require_subtype_stage, save_subtype_stage_adapted
from smear.classifier.model import load_classifier
from smear.configs.errors import SmearError
from smear.data.taxonomy import GROUPS
from smear.detector.predict import Detector


def wbc_neighbourhood(image: np.ndarray, box) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The part of ``image`` within one box side of ``box`` (room for the widest training crop: margin, zoom, shift
    and rotation), and the box in its coordinates: a copy, so the whole field is not kept for each WBC."""
    x1, y1, x2, y2 = map(float, box)
    side = max(x2 - x1, y2 - y1)
    h, w = image.shape[:2]
    left, top = max(0, int(x1 - side)), max(0, int(y1 - side))
    right, bottom = min(w, int(np.ceil(x2 + side))), min(h, int(np.ceil(y2 + side)))
    return image[top:bottom, left:right].copy(), (x1 - left, y1 - top, x2 - left, y2 - top)


def adapt_from_fields(fields: Iterable[np.ndarray], output: Path, base: str | Path | None = None,
                      detector: str | Path | None = None, source: str = "") -> Path:
    """Re-estimate the subtype stage of ``base`` (default ``ADAPT_BASE``) on the WBCs of ``fields`` and write the
    cascade as ``output``; the group decision and every weight stay the base model's.

    Raises:
        SmearError: a base without a subtype stage, or no WBC found in the fields.
    """
    t0 = time.time()
    model = load_classifier(base or ADAPT_BASE)
    stage = require_subtype_stage(model)
    det = Detector(detector)
    thresholds = det.info.card.get("operating_thresholds") or None
    cells: list[tuple[np.ndarray, tuple[float, float, float, float]]] = []
    n_fields = 0
    for image in fields:
        n_fields += 1
        found = det.predict([image], conf=thresholds, scale="auto")[0]
        cells += [wbc_neighbourhood(image, b) for b in found.boxes[found.classes == GROUPS.index("WBC")]]
    if not cells:
        raise SmearError(f"no WBC found in {n_fields} field(s): nothing to re-estimate the subtype stage's "
                         "statistics on")
    net = recalibrate_batchnorm(stage, cells)
    return save_subtype_stage_adapted(model, net, output, {
        "fields": n_fields, "wbcs": len(cells), "source": source, "detector": str(det.info.weights),
        "method": "AdaBN: the subtype stage's trained batch-norm layers re-estimated on the lab's WBC crops through "
                  "its training augmentation; weights unchanged", "minutes": round((time.time() - t0) / 60, 2)})
