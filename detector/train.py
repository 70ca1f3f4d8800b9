"""Train the YOLO detector and write a self-describing run folder."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from smear.configs.errors import SmearError
from smear.configs.loader import config_to_dict, dump_config
from smear.configs.offline import ensure_offline, use_cpu_threads
from smear.configs.paths import git_commit, resolve_path
from smear.data.taxonomy import GROUPS

from .config import DetectorConfig

log = logging.getLogger(__name__)

_TRAIN_KEYS = ("imgsz", "epochs", "time", "batch", "nbs", "cache", "workers", "device", "optimizer", "lr0", "cos_lr",
               "warmup_epochs", "patience", "seed", "fliplr", "flipud", "degrees", "scale", "translate", "hsv_h",
               "hsv_s", "hsv_v", "mosaic", "mixup", "close_mosaic", "rect")


def train_detector(cfg: DetectorConfig, resume: bool = False) -> Path:
    """Train with ultralytics; returns the run folder (``weights/best.pt``, ``config.yaml``, ``card.json``).

    A checkpoint is written every epoch (``weights/last.pt``); ``resume=True`` continues it.
    """
    ensure_offline()
    from ultralytics import YOLO

    commit = git_commit()  # the code that trains: taken at the start, not when the card is written
    run_dir = resolve_path(cfg.project) / cfg.name
    if resume:  # the run goes on with the settings it started with, and its card records those
        cfg = run_config(run_dir, cfg)
    threads = use_cpu_threads(cfg.threads)
    log.info("training on %d CPU thread(s) (device %s)", threads, cfg.device)
    data = resolve_path(cfg.data)
    if not data.is_file():
        raise SmearError(f"{data}: detector data.yaml not found; make it with "
                         f"'smear data prepare --out {data.parent.parent}'")
    last = run_dir / "weights" / "last.pt"
    if resume:
        if not last.is_file():
            raise SmearError(f"{last}: no checkpoint to resume; start without --resume")
        model = YOLO(str(last))
        t0 = time.time()
        model.train(resume=True, **_trainer(cfg))
    else:
        if run_dir.exists():
            raise SmearError(f"{run_dir}: run folder exists; pass --resume, or another name=... ")
        model_src = cfg.model
        if model_src.endswith(".pt"):
            p = resolve_path(model_src)
            if not p.is_file():
                raise SmearError(f"{p}: start weights not found (nothing is downloaded); give a local .pt "
                                 f"or an architecture yaml such as yolov8n.yaml to train from scratch")
            model_src = str(p)
        model = YOLO(model_src)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "smear_config.yaml").write_text(dump_config(cfg))
        t0 = time.time()
        model.train(data=str(data), project=str(run_dir.parent), name=run_dir.name, exist_ok=True,
                    pretrained=model_src.endswith(".pt"), amp=False, plots=True, verbose=True, val=True,
                    save_period=-1, **_trainer(cfg), **{k: getattr(cfg, k) for k in _TRAIN_KEYS})
    minutes = (time.time() - t0) / 60
    best = run_dir / "weights" / "best.pt"
    card = {
        "kind": "detector", "classes": list(GROUPS), "config": config_to_dict(cfg), "data": str(data),
        "split": describe_split(data),
        "train_minutes_this_session": round(minutes, 1), "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "weights": str(best),
    }
    (run_dir / "card.json").write_text(json.dumps(card, indent=2))
    return run_dir


def run_config(run_dir: Path, cfg: DetectorConfig) -> DetectorConfig:
    """The settings a run started with (its ``smear_config.yaml``), else ``cfg``. ultralytics resumes with the
    arguments it stored in the checkpoint; smear's own (the stain and focus augmentation) are kept there."""
    from smear.configs.loader import load_config

    stored = run_dir / "smear_config.yaml"
    return load_config(DetectorConfig, stored) if stored.is_file() else cfg


def _trainer(cfg: DetectorConfig) -> dict:
    """ultralytics' ``trainer`` argument: a trainer with stain jitter and blur when the config asks for them."""
    if cfg.stain_jitter <= 0 and cfg.blur <= 0:
        return {}
    from .augment import augmenting_trainer

    return {"trainer": augmenting_trainer(cfg.stain_jitter, cfg.blur)}


def describe_split(data_yaml: Path) -> dict:
    """Images per split of a YOLO set, and per source where the set names them (``fields.csv``)."""
    import csv
    from collections import Counter

    import yaml

    from .evaluate import count_images

    cfg = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    out: dict = {"data": str(data_yaml)}
    for split in ("train", "val", "test"):
        if n := count_images(data_yaml, split):
            out[f"{split}_images"] = n
    fields = root / "fields.csv"
    if fields.is_file():
        with open(fields, newline="") as f:
            n = Counter((r["split"], r["source"]) for r in csv.DictReader(f))
        out["per_source"] = {f"{split}/{src}": k for (split, src), k in sorted(n.items())}
    return out


def rbc_median_diameter_px(data_yaml: Path, split: str = "train") -> float | None:
    """Median RBC box side (mean of width and height) in the training labels: the detector's scale."""
    import statistics

    import yaml

    from smear.data.images import image_size

    cfg = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    names = cfg["names"]
    rbc = [int(k) for k, v in (names.items() if isinstance(names, dict) else enumerate(names)) if v == "RBC"]
    sizes = []
    for lbl in sorted((root / "labels" / split).glob("*.txt")):
        imgs = list((root / "images" / split).glob(lbl.stem + ".*"))
        if not imgs:
            continue
        size = image_size(imgs[0])
        if size is None:
            continue
        w, h = size
        for line in lbl.read_text().splitlines():
            p = line.split()
            if len(p) >= 5 and int(p[0]) in rbc:
                sizes.append((float(p[3]) * w + float(p[4]) * h) / 2)
    return round(statistics.median(sizes), 1) if sizes else None


def package_detector(run_dir: Path, dest: Path, extra: dict | None = None) -> Path:
    """Copy a run's best weights into a self-describing model folder (weights.pt, card.json, card.md)."""
    import csv

    from smear.configs.modelcard import ModelCard

    run_dir = Path(run_dir)
    card = json.loads((run_dir / "card.json").read_text()) if (run_dir / "card.json").is_file() else {}
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise SmearError(f"{best}: no best weights in the run folder")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, dest / "weights.pt")  # ultralytics strips the optimiser and stores fp16
    rows = list(csv.DictReader(open(run_dir / "results.csv"))) if (run_dir / "results.csv").is_file() else []
    if rows:
        key = "metrics/mAP50-95(B)"
        b = max(rows, key=lambda r: 0.1 * float(r["metrics/mAP50(B)"]) + 0.9 * float(r[key]))  # ultralytics' fitness
        card["val_metrics_best_epoch"] = {"epoch": int(float(b["epoch"])), "mAP50": float(b["metrics/mAP50(B)"]),
                                          "mAP50_95": float(b[key]), "precision": float(b["metrics/precision(B)"]),
                                          "recall": float(b["metrics/recall(B)"])}
        card["epochs_run"] = len(rows)
        card["train_minutes"] = round(float(rows[-1]["time"]) / 60, 1)
    data = Path(card.get("data", "")) if card.get("data") else None
    if data and data.is_file():
        card["rbc_median_diameter_px"] = rbc_median_diameter_px(data)
        card["split"] = describe_split(data)
    card.update(extra or {})
    ModelCard.from_dict(card).write(dest)
    for name in ("results.csv", "results.png"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
    return dest
