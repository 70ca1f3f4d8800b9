"""Evaluate the detector on a split: mAP50, mAP50-95, per-class AP, precision, recall and plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from smear.configs.errors import SmearError
from smear.configs.offline import ensure_offline
from smear.configs.paths import resolve_path
from smear.data.audit import INCOMPLETE_LABELS
from smear.data.taxonomy import GROUPS

from .config import DetectorConfig
from .model import find_detector

log = logging.getLogger(__name__)


def evaluate_detector(weights: str | Path | None = None, split: str = "test", data: str | Path | None = None,
                      output: Path | None = None, imgsz: int | None = None, device: str = "cpu",
                      conf: float = 0.001, iou: float = 0.7) -> dict:
    """Score a detector with ultralytics' validator; writes metrics.json, confusion matrix and PR curves.

    Where the prepared set lists images known to lack a box of some class (``incomplete_labels.csv``,
    written by 'smear data prepare'), the metrics are given twice: as the labels stand (the official
    figure) and under ``audited``: a WBC boxed as an oversized "platelet" is scored as a WBC, and
    otherwise that class's detections in those images are ignored (see :func:`ignoring_validator`).
    """
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
    metrics = {
        "split": split, "weights": str(info.weights), "imgsz": size, "images": count_images(data_yaml, split),
        **_box_metrics(res),
        # ultralytics' matrix: rows are predictions, columns ground truth, at the validation conf.
        "confusion_matrix": {"labels": list(GROUPS) + ["background"], "rows": "predicted", "columns": "true",
                             "conf": conf, "matrix": res.confusion_matrix.matrix.astype(int).tolist()},
        "plots": str(out),
    }
    ignore = read_incomplete_labels(data_yaml, split)
    if ignore:
        audited = model.val(data=str(data_yaml), split=split, imgsz=size, batch=8, conf=conf, iou=iou,
                            device=device, plots=False, project=str(out.parent), name=out.name, exist_ok=True,
                            verbose=False, validator=ignoring_validator(ignore))
        metrics["audited"] = {
            "ignored": {stem: sorted(GROUPS[c] for c in cls) for stem, cls in sorted(ignore.items())},
            "source": str(data_yaml.parent / INCOMPLETE_LABELS), **_box_metrics(audited),
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _box_metrics(res) -> dict:
    box = res.box
    per_class = {}
    for i, c in enumerate(box.ap_class_index):
        per_class[res.names[int(c)]] = {"AP50": round(float(box.ap50[i]), 4), "AP50_95": round(float(box.ap[i]), 4),
                                        "precision": round(float(box.p[i]), 4), "recall": round(float(box.r[i]), 4)}
    return {"mAP50": round(float(box.map50), 4), "mAP50_95": round(float(box.map), 4),
            "precision": round(float(box.mp), 4), "recall": round(float(box.mr), 4), "per_class": per_class}


def read_incomplete_labels(data_yaml: Path, split: str) -> dict[str, set[int]]:
    """Image stem -> class indices whose boxes that image is known to lack, for one split."""
    path = Path(data_yaml).parent / INCOMPLETE_LABELS
    if not path.is_file():
        return {}
    out: dict[str, set[int]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("split") != split:
                continue
            if row.get("class") not in GROUPS:
                raise SmearError(f"{path}: unknown class {row.get('class')!r}; expected one of {', '.join(GROUPS)}")
            out.setdefault(row["image"], set()).add(GROUPS.index(row["class"]))
    return out


def ignoring_validator(ignore: dict[str, set[int]]):
    """ultralytics' detection validator, scoring the listed images on audited labels.

    In an image listed as lacking its WBC box, a "Platelets" box larger than the image's median RBC
    (:func:`~smear.pipeline.dataset.oversized_platelets`, the audit's rule) is scored as that WBC.
    Otherwise the listed classes' detections are dropped there: an image has no box of such a class,
    so they are neither true nor false positives, as with VOC's 'difficult' objects. Everything else is
    scored unchanged.
    """
    import torch
    from ultralytics.models.yolo.detect import DetectionValidator

    from smear.data.audit import oversized_platelets

    wbc = GROUPS.index("WBC")

    class IgnoringValidator(DetectionValidator):
        def _prepare_batch(self, si, batch):
            pbatch = super()._prepare_batch(si, batch)
            if wbc in ignore.get(Path(pbatch["im_file"]).stem, ()) and len(pbatch["cls"]):
                b = pbatch["bboxes"]
                sides = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).cpu().numpy()
                big, _ = oversized_platelets([GROUPS[int(c)] for c in pbatch["cls"]], sides)
                if big.any():
                    cls = pbatch["cls"].clone()
                    cls[torch.from_numpy(big).to(cls.device)] = wbc
                    pbatch["cls"] = cls
            return pbatch

        def update_metrics(self, preds, batch):
            for si, pred in enumerate(preds):
                drop = set(ignore.get(Path(batch["im_file"][si]).stem, ()))
                if wbc in drop and (self._prepare_batch(si, batch)["cls"] == wbc).any():
                    drop.discard(wbc)  # its WBC is boxed after all, as a "platelet": scored, not ignored
                if drop and pred["cls"].numel():
                    keep = ~torch.isin(pred["cls"].long(), torch.tensor(sorted(drop), device=pred["cls"].device))
                    preds[si] = {k: v[keep] for k, v in pred.items()}
            super().update_metrics(preds, batch)

    return IgnoringValidator


def count_images(data_yaml: Path, split: str) -> int:
    """How many images a split of a YOLO set holds (0 for a split it does not name)."""
    import yaml

    from smear.data.images import IMAGE_SUFFIXES

    cfg = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    folder = root / str(cfg.get(split, ""))
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if cfg.get(split) else 0


def _model_folder(weights: str | Path | None) -> Path:
    """The model folder of ``weights`` (a folder with a card.json), for writing its card."""
    info = find_detector(weights)
    folder = info.weights.parent
    if not (folder / "card.json").is_file():
        raise SmearError(f"{info.weights}: not inside a model folder with a card.json; --write-card needs a model "
                         f"folder ('smear detector package', or the shipped one)")
    return folder


def _stamp(command: str) -> dict:
    """What a card section records about the run that measured it: command, date and commit."""
    import time

    from smear.configs.paths import git_commit

    return {"command": command, "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}


def record_metrics(weights: str | Path | None, metrics: dict, command: str) -> Path:
    """Write evaluation metrics into the evaluated model folder's card (``<split>_metrics``, and
    ``<split>_metrics_audited`` when the split has audited labels), with the command, date and commit."""
    from smear.configs.modelcard import ModelCard

    folder = _model_folder(weights)
    split = metrics["split"]
    stamp = _stamp(command)
    card = ModelCard.read(folder)
    card.set(f"{split}_metrics", {**stamp, **{k: v for k, v in metrics.items() if k not in ("audited", "plots")}})
    if metrics.get("audited"):
        card.set(f"{split}_metrics_audited", {**stamp, **metrics["audited"]})
    return card.write(folder)


def count_labels(data_yaml: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """The images of a YOLO split and their labelled cells per group, shape (images, groups)."""
    from smear.data.formats import read_yolo
    from smear.data.taxonomy import group_of

    fields = [ai for ai in read_yolo(Path(data_yaml)) if ai.split == split]
    counts = np.zeros((len(fields), len(GROUPS)), int)
    for i, ai in enumerate(fields):
        for b in ai.boxes:
            counts[i, GROUPS.index(group_of(b.label))] += 1
    return [Path(ai.image_path) for ai in fields], counts


def choose_thresholds(weights: str | Path | None = None, split: str = "val", data: str | Path | None = None,
                      candidates: tuple[float, ...] = tuple(round(0.2 + 0.05 * k, 2) for k in range(11)),
                      device: str = "cpu") -> dict:
    """Per-group operating thresholds that minimise the count error per image on a labelled split.

    The detector runs once at the lowest candidate; each group's threshold is the candidate with the
    lowest mean absolute count error against the labels (the lower threshold on ties). Choose on a split
    with complete labels (every cell boxed), never on the test split.
    """
    from smear.data.images import read_image

    from .predict import Detector

    if split == "test":
        raise SmearError("thresholds are chosen on val (or train), never on the test split")
    data_yaml = Path(data) if data else resolve_path(DetectorConfig().data)
    images, truth = count_labels(data_yaml, split)
    if not images:
        raise SmearError(f"{data_yaml}: no images in split '{split}'")
    det = Detector(weights, device=device)
    found = [det.predict([read_image(p)], conf=min(candidates))[0] for p in images]
    table, chosen = [], {}
    for g, name in enumerate(GROUPS):
        rows = []
        for t in candidates:
            pred = np.array([int(((d.classes == g) & (d.scores >= t)).sum()) for d in found])
            rows.append({"group": name, "threshold": t, "count_mae": round(float(np.abs(pred - truth[:, g]).mean()), 4),
                         "count_bias": round(float((pred - truth[:, g]).mean()), 4)})
        best = min(rows, key=lambda r: (r["count_mae"], r["threshold"]))
        chosen[name] = best["threshold"]
        table += rows
    best = {(r["group"], r["threshold"]): r for r in table}
    return {"operating_thresholds": chosen, "chosen": {g: best[(g, t)] for g, t in chosen.items()}, "split": split,
            "data": str(data_yaml), "images": len(images),
            "rule": "per group, the candidate threshold with the lowest count MAE per image (lower on ties)",
            "table": table}


def record_thresholds(weights: str | Path | None, res: dict, command: str) -> Path:
    """Write :func:`choose_thresholds`' choice into the model folder's card: ``operating_thresholds`` (what the
    pipeline counts with) and ``operating_thresholds_choice`` (how, on what, and the count error there)."""
    from smear.configs.modelcard import ModelCard

    folder = _model_folder(weights)
    card = ModelCard.read(folder)
    card.set("operating_thresholds", res["operating_thresholds"])
    card.set("operating_thresholds_choice", {
        **_stamp(command),
        **{k: res[k] for k in ("split", "data", "images", "rule")},
        "count_mae": {g: r["count_mae"] for g, r in res["chosen"].items()}})
    return card.write(folder)
