"""Shared fixtures: drawn smear fields, tiny VOC sets, and tiny untrained models (no network, no training)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


def draw_field(seed: int = 0, size: tuple[int, int] = (640, 480), n_rbc: int = 12, n_wbc: int = 1,
               n_plt: int = 2) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """A synthetic smear field (RGB) and its boxes: pink RBC discs, a purple WBC, small platelets."""
    import cv2

    rng = random.Random(seed)
    w, h = size
    img = np.full((h, w, 3), (235, 215, 220), np.uint8)
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    for label, n, r_range, colour in (("RBC", n_rbc, (34, 44), (205, 120, 130)),
                                      ("WBC", n_wbc, (55, 65), (120, 60, 160)),
                                      ("Platelets", n_plt, (8, 11), (140, 90, 170))):
        for _ in range(n):
            r = rng.randint(*r_range)
            cx, cy = rng.randint(r, w - r - 1), rng.randint(r, h - r - 1)
            cv2.circle(img, (cx, cy), r, colour, -1)
            if label == "RBC":
                cv2.circle(img, (cx, cy), r // 3, (225, 170, 175), -1)  # central pallor
            if label == "WBC":
                cv2.circle(img, (cx - r // 4, cy), r // 2, (80, 30, 120), -1)  # nucleus
            boxes.append((label, (cx - r, cy - r, cx + r, cy + r)))
    return img, boxes


def write_voc(root: Path, n_images: int = 6, splits: bool = True, extra_objects: dict | None = None) -> Path:
    """A tiny BCCD-like VOC folder: JPEGImages/, Annotations/, ImageSets/Main/."""
    import cv2

    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_images):
        image_id = f"BloodImage_{i:05d}"
        ids.append(image_id)
        img, boxes = draw_field(seed=i)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        objects = list(boxes) + list((extra_objects or {}).get(image_id, []))
        objs = "".join(
            f"<object><name>{lab}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>" for lab, b in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{img.shape[1]}</width>"
            f"<height>{img.shape[0]}</height><depth>3</depth></size>{objs}</annotation>")
    if splits:
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        n = len(ids)
        parts = {"train": ids[: n // 2], "val": ids[n // 2: 3 * n // 4], "test": ids[3 * n // 4:]}
        for k, v in parts.items():
            (root / "ImageSets" / "Main" / f"{k}.txt").write_text("\n".join(v) + "\n")
    return root


@pytest.fixture
def field_image(tmp_path) -> Path:
    import cv2

    img, _ = draw_field(seed=42)
    p = tmp_path / "field.png"
    cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return p


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    return write_voc(tmp_path / "voc")


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> Path:
    """An untrained 3-class YOLOv8n checkpoint that ultralytics loads like a trained one."""
    import torch

    from smear.configs.offline import ensure_offline

    ensure_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    m.names = {0: "RBC", 1: "WBC", 2: "Platelets"}
    folder = tmp_path_factory.mktemp("tiny_detector")
    torch.save({"model": m.half(), "train_args": {"imgsz": 320, "task": "detect"}, "date": "test", "version": "test"},
               folder / "weights.pt")
    (folder / "card.json").write_text(json.dumps({"kind": "detector", "classes": ["RBC", "WBC", "Platelets"],
                                                  "config": {"imgsz": 320}, "rbc_median_diameter_px": 100}))
    return folder


def make_untrained_model_folder(folder: Path, config_cls, values: dict, classes, kind: str) -> Path:
    """An untrained model folder (weights.pt + card.json) of a CellClassifier-based stage."""
    import torch

    from smear.classifier.model import CellClassifier, save_model_folder
    from smear.configs.loader import build_config, config_to_dict

    torch.manual_seed(0)
    cfg = build_config(config_cls, values)
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, "none")
    save_model_folder(folder, net, {"kind": kind, "classes": list(classes), "config": config_to_dict(cfg)})
    return folder


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """An untrained classifier folder (mobilenet_v2, no pretrained weights) at 32 px."""
    from smear.classifier.config import ClassifierConfig
    from smear.data.taxonomy import CELL_CLASSES

    return make_untrained_model_folder(
        tmp_path_factory.mktemp("tiny_classifier"), ClassifierConfig,
        {"backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32}, CELL_CLASSES, "classifier")


requires_shared_data = pytest.mark.skipif(not (SHARED_DATA / "bccd" / "Annotations").is_dir(),
                                          reason="../shared/data not present")


class AnalyzerBuilt(Exception):
    """Raised by the stand-in of :func:`analyzer_thresholds` once it has seen the config."""


@pytest.fixture
def analyzer_thresholds(monkeypatch) -> dict:
    """Replace ``Analyzer`` with a stand-in that records its config's thresholds, then raises AnalyzerBuilt.

    Lets a test check which operating point a command hands the pipeline without loading models.
    """
    import smear.pipeline.analyze as analyze_mod

    seen: dict = {}

    class Capture:
        def __init__(self, cfg):
            from smear.detector.model import find_detector

            # as Analyzer does: class_conf 'detector' resolves against the chosen detector's card
            seen["thresholds"] = cfg.for_detector(find_detector(cfg.detector_weights or None).card).thresholds()
            raise AnalyzerBuilt

    monkeypatch.setattr(analyze_mod, "Analyzer", Capture)
    return seen


@pytest.fixture
def restore_threads():
    """Put torch's (and ultralytics') CPU thread count back after a test that changes it."""
    import torch

    from smear.configs.offline import use_cpu_threads

    before = torch.get_num_threads()
    yield
    use_cpu_threads(before)


def make_cell(group: str, box=(100, 100, 140, 140)):
    """A detected cell of ``group`` with a confident score and no classifier output."""
    from smear.pipeline.results import Cell

    return Cell(box=list(box), group=group, label=group, score=0.9, detector={}, classifier={})


def cells_with_morphology(labels: dict[str, int]) -> list:
    """RBCs carrying a morphology call: ``{"normal": 490, "schistocyte": 10}`` gives 500 cells."""
    cells = []
    for lab, n in labels.items():
        for _ in range(n):
            c = make_cell("RBC")
            c.morphology = {"label": lab, "score": 0.9}
            cells.append(c)
    return cells
