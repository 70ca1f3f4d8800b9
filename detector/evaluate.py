"""Evaluate the detector on a split: mAP50, mAP50-95, per-class AP, precision, recall and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from smear.pipeline.dataset import GROUPS
from smear.pipeline.errors import SmearError
from smear.pipeline.offline import ensure_offline
from smear.pipeline.paths import resolve_path

from .config import DetectorConfig
from .model import find_detector

log = logging.getLogger(__name__)


def evaluate_detector(weights: str | Path | None = None, split: str = "test", data: str | Path | None = None,
                      output: Path | None = None, imgsz: int | None = None, device: str = "cpu",
                      conf: float = 0.001, iou: float = 0.7) -> dict:
    """Score a detector with ultralytics' validator; writes metrics.json, confusion matrix and PR curves."""
    ensure_offline()
    from ultralytics import YOLO

    info = find_detector(weights)
    data_yaml = Path(data) if data else resolve_path(DetectorConfig().data)
    if not data_yaml.is_file():
        raise SmearError(f"{data_yaml}: data.yaml not found; make it with 'smear data prepare --out "
                         f"{data_yaml.parent.parent}'")
    out = Path(output) if output else resolve_path("runs/detector_eval") / f"{info.weights.parent.name}-{split}"
    out.mkdir(parents=True, exist_ok=True)
    model = YOLO(str(info.weights), task="detect")
    size = imgsz or info.imgsz
    res = model.val(data=str(data_yaml), split=split, imgsz=size, batch=8, conf=conf, iou=iou, device=device,
                    plots=True, project=str(out.parent), name=out.name, exist_ok=True, verbose=False)
    box = res.box
    names = res.names
    per_class = {}
    for i, c in enumerate(box.ap_class_index):
        name = names[int(c)]
        per_class[name] = {"AP50": round(float(box.ap50[i]), 4), "AP50_95": round(float(box.ap[i]), 4),
                           "precision": round(float(box.p[i]), 4), "recall": round(float(box.r[i]), 4)}
    metrics = {
        "split": split, "weights": str(info.weights), "imgsz": size, "images": _count_images(data_yaml, split),
        "mAP50": round(float(box.map50), 4), "mAP50_95": round(float(box.map), 4),
        "precision": round(float(box.mp), 4), "recall": round(float(box.mr), 4), "per_class": per_class,
        # ultralytics' matrix: rows are predictions, columns ground truth, at the validation conf.
        "confusion_matrix": {"labels": list(GROUPS) + ["background"], "rows": "predicted", "columns": "true",
                             "conf": conf, "matrix": res.confusion_matrix.matrix.astype(int).tolist()},
        "plots": str(out),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _count_images(data_yaml: Path, split: str) -> int:
    import yaml

    from smear.pipeline.io import IMAGE_SUFFIXES

    cfg = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    folder = root / str(cfg.get(split, ""))
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if cfg.get(split) else 0
