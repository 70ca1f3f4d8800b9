"""RBC morphology stage: one of the 13 Chula RBC-12 classes for every detected red cell.

Data: Chula RBC-12 (``Dataset/N.jpg`` 640x480 at 1000x, ``Label/N.txt`` lines ``x y class``,
one point per cell). The images are split by image id (a hash of id and seed, so the split
never changes when images are added); the lists are saved in each model folder.

Crops. A training crop is a square of ``crop_px`` training pixels centred on the labelled
point, resized to ``input_size_px``. Chula RBCs measure about 35 px (median equivalent
diameter of isolated cells under an Otsu mask), so a crop holds one cell and a thin ring of
background. Detected boxes are a little larger than the cells: the BCCD detector's RBC boxes on
Chula fields have a median diameter of 39 px, which is ``cell_diameter_px``. At inference the
crop side is scaled so that the field's *median* RBC box diameter maps to ``cell_diameter_px``::

    side = crop_px * median_rbc_box_diameter / cell_diameter_px

The scale comes from the field rather than from each cell, so relative size survives: a cell
twice the field's median still looks twice as large, which is what separates macrocytes and
microcytes from normal cells. With a known pixel size (``pixel_size_um``) the absolute scale
of Chula (7.5 um normal RBC over ``cell_diameter_px``) is used instead; without one, a field
made only of microcytes (or only of macrocytes) looks normal-sized. Fields with fewer than
``MIN_RBC_FOR_FIELD_SCALE`` RBCs fall back to each cell's own box.

Normal vs abnormal: ``abnormal`` is any class other than ``normal``. ``uncategorised`` cells
(the annotators could not name the change) are left out of the normal-vs-abnormal truth
(they are neither a named abnormality nor normal); a prediction of ``uncategorised`` counts as
abnormal, and its share is reported but never flagged.

Flags (``morphology_flags``) are morphology hints, never anemia: anemia is defined by
haemoglobin, which no image measures.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from smear.configs.errors import ModelNotFoundError, SmearError
from smear.configs.loader import param
from smear.data.chula import PointLabel, read_chula, split_images
from smear.data.taxonomy import MORPHOLOGY_CLASSES, NORMAL, UNCATEGORISED

from .config import BACKBONES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "chula-morphology"
RBC_DIAMETER_UM = 7.5
MIN_RBC_FOR_FIELD_SCALE = 5
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MorphologyConfig:
    """Training settings of the RBC morphology classifier (configs/morphology.yaml)."""

    data_root: str = param("../shared/data/chula-rbc-12", "Chula RBC-12 folder (Dataset/, Label/)")
    cell_diameter_px: float = param(39.0, "typical RBC box diameter in the training images, px; used at inference "
                                    "only (Chula: detector boxes median 39, Otsu masks 35)", range=(4.0, 1000.0))
    crop_px: int = param(56, "side of the square cut around each labelled point, training-image px", range=(8, 1024))
    input_size_px: int = param(64, "side of the network input (the crop is resized to it)", range=(32, 512))
    backbone: str = param("mobilenet_v2", "feature extractor (mobilenet_v2: twice the CPU speed of efficientnet_lite0 "
                           "at 64 px)", choices=BACKBONES)
    pretrained: str = param("imagenet", "'imagenet' (local weights only, never downloaded), 'none', or a .pt/.pth file")
    head_hidden: int = param(128, "units of the dense layer after global average pooling", range=(8, 4096))
    dropout: float = param(0.3, "dropout before the output layer", range=(0.0, 0.95))
    epochs: int = param(30, "maximum training epochs (all layers trained, cosine learning-rate decay)", range=(1, 1000))
    samples_per_epoch: int = param(6400, "crops drawn per epoch (with replacement, class-weighted)", range=(32, 10**7))
    max_minutes: float = param(20.0, "time budget: the learning rate decays by time or steps, whichever is further "
                               "along, and training stops after the epoch that passes it (0: none)", range=(0.0, None))
    lr: float = param(1e-3, "peak AdamW learning rate", range=(1e-7, 1.0))
    weight_decay: float = param(1e-4, "AdamW weight decay", range=(0.0, 1.0))
    batch: int = param(32, "crops per batch", range=(1, 1024))
    balance_power: float = param(0.5, "class weighting: 0 natural frequencies, 1 fully balanced", range=(0.0, 1.0))
    label_smoothing: float = param(0.05, "cross-entropy label smoothing", range=(0.0, 0.5))
    center_jitter_px: float = param(2.0, "training shift of the labelled point, training-image px", range=(0.0, 50.0))
    zoom: float = param(0.05, "training zoom jitter (+/- fraction); small, since size is a class cue", range=(0.0, 0.5))
    rotate: bool = param(True, "random rotation by any angle during training")
    flip: bool = param(True, "random flips during training")
    hue_jitter: float = param(0.02, "stain hue jitter (fraction of the hue circle)", range=(0.0, 0.5))
    saturation_jitter: float = param(0.15, "stain saturation jitter (+/- fraction)", range=(0.0, 1.0))
    brightness_jitter: float = param(0.15, "brightness / contrast jitter (+/- fraction)", range=(0.0, 1.0))
    val_fraction: float = param(0.15, "image fraction held out for model choice", range=(0.0, 0.5))
    test_fraction: float = param(0.15, "image fraction held out for the test metrics", range=(0.0, 0.5))
    split_seed: int = param(0, "seed of the image-level split", range=(0, None))
    seed: int = param(0, "random seed of initialisation, sampling and augmentation", range=(0, None))
    threads: int = param(1, "CPU threads for torch", range=(1, 256))
    device: str = param("cpu", "torch device: cpu, cuda, cuda:0, mps")
    project: str = param("runs/morphology", "folder that receives training runs")
    name: str = param("chula", "run name (a folder under project)")


# ---------------------------------------------------------------- data











def point_crop(image: np.ndarray, x: float, y: float, side_px: float, size_px: int, angle: float = 0.0,
               flip: bool = False) -> np.ndarray:
    """Square crop of ``side_px`` centred on (x, y), rotated by ``angle`` degrees, resized to ``size_px``.

    Outside the image the field is mirrored, in training and at inference alike.
    """
    import cv2

    scale = size_px / max(side_px, 1.0)
    m = cv2.getRotationMatrix2D((float(x), float(y)), angle, scale)
    m[0, 2] += size_px / 2 - x
    m[1, 2] += size_px / 2 - y
    crop = cv2.warpAffine(image, m, (size_px, size_px), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(crop[:, ::-1]) if flip else crop


def augmented_point_crop(image: np.ndarray, cell: PointLabel, cfg: MorphologyConfig, rng: random.Random) -> np.ndarray:
    """A training crop: shifted point, small zoom, any-angle rotation, flips, stain jitter."""
    from .train import stain_jitter

    x = cell.x + rng.uniform(-1, 1) * cfg.center_jitter_px
    y = cell.y + rng.uniform(-1, 1) * cfg.center_jitter_px
    side = cfg.crop_px * (1 + rng.uniform(-1, 1) * cfg.zoom)
    crop = point_crop(image, x, y, side, cfg.input_size_px, rng.uniform(0, 360) if cfg.rotate else 0.0,
                      cfg.flip and rng.random() < 0.5)
    return stain_jitter(crop, cfg.hue_jitter, cfg.saturation_jitter, cfg.brightness_jitter, rng)


def eval_point_crops(cells: Sequence[PointLabel], crop_px: float, size_px: int,
                     images: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Plain (unaugmented) crops of labelled cells, each image decoded once."""
    from smear.data.images import read_image

    images = {} if images is None else images
    out = []
    for c in cells:
        if c.image not in images:
            images[c.image] = read_image(c.image)
        out.append(point_crop(images[c.image], c.x, c.y, crop_px, size_px))
    return out


# ---------------------------------------------------------------- metrics

def morphology_report(y_true: Sequence[str], probs: np.ndarray, classes: Sequence[str] = MORPHOLOGY_CLASSES) -> dict:
    """Per-class P/R/F1, macro-F1, confusion matrix and normal-vs-abnormal figures, JSON-ready.

    macro-F1 averages the classes with test support. Normal vs abnormal leaves out cells whose
    truth is ``uncategorised``; its score is 1 - p(normal), its call is argmax != normal.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    classes = list(classes)
    y_true = list(y_true)
    y_pred = [classes[k] for k in probs.argmax(1)] if len(y_true) else []
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    per_class = {c: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4), "f1": round(float(f[i]), 4),
                     "support": int(s[i])} for i, c in enumerate(classes)}
    supported = [c for c in classes if per_class[c]["support"] > 0]
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": round(float(np.mean([a == b for a, b in zip(y_true, y_pred)])), 4) if y_true else None,
        "macro_f1": round(float(np.mean([per_class[c]["f1"] for c in supported])), 4) if supported else None,
        "balanced_accuracy": (round(float(np.mean([per_class[c]["recall"] for c in supported])), 4)
                              if supported else None),
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist()
                             if y_true else [[0] * len(classes) for _ in classes]},
    }
    keep = [i for i, t in enumerate(y_true) if t != UNCATEGORISED]
    k_normal = classes.index(NORMAL)
    yt = np.array([y_true[i] != NORMAL for i in keep], bool)
    score = 1 - probs[keep, k_normal] if keep else np.zeros(0)
    yp = np.array([y_pred[i] != NORMAL for i in keep], bool)
    binary: dict[str, Any] = {"n": len(keep), "n_abnormal": int(yt.sum()), "n_normal": int((~yt).sum()),
                              "left_out_uncategorised": len(y_true) - len(keep)}
    if yt.any() and (~yt).any():
        sens, spec = float(yp[yt].mean()), float((~yp[~yt]).mean())
        binary.update({"sensitivity": round(sens, 4), "specificity": round(spec, 4),
                       "balanced_accuracy": round((sens + spec) / 2, 4),
                       "roc_auc": round(float(roc_auc_score(yt, score)), 4)})
    out["normal_vs_abnormal"] = binary
    return out


def _predict(model: "MorphologyModel", crops: Sequence[np.ndarray]) -> np.ndarray:
    from .predict import predict_crops

    return predict_crops(model.model, crops)


# ---------------------------------------------------------------- training

def _class_weights(labels: list[str], power: float) -> dict[str, float]:
    counts = {c: max(1, labels.count(c)) for c in MORPHOLOGY_CLASSES}
    return {c: counts[c] ** -power for c in MORPHOLOGY_CLASSES}


def _counts(cells: Iterable[PointLabel]) -> dict[str, int]:
    labels = [c.label for c in cells]
    return {k: labels.count(k) for k in MORPHOLOGY_CLASSES}


def train_morphology(cfg: MorphologyConfig | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train on the train images, choose the epoch on val macro-F1, write ``project/name/model``.

    The folder holds ``weights.pt`` (fp16), ``card.json`` (classes, config, split, val metrics,
    date, commit), ``split.json`` and ``history.json``; ``last.pt`` is written every epoch and
    ``resume=True`` continues it. Test images are never read here: see ``evaluate_morphology``.
    """
    import torch
    from torch import nn

    from smear.configs.loader import config_to_dict, dump_config
    from smear.configs.paths import git_commit, resolve_path
    from smear.data.images import read_image

    from .model import CellClassifier, ClassifierModel, save_model_folder
    from .predict import to_tensor
    from .train import optimise_epoch

    cfg = cfg or MorphologyConfig()
    torch.set_num_threads(cfg.threads)
    root = resolve_path(cfg.data_root)
    data = read_chula(root)
    split = split_images(data, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    train_cells = [c for i in split["train"] for c in data[i]]
    val_cells = [c for i in split["val"] for c in data[i]]
    if not train_cells:
        raise SmearError(f"{root}: no training cells after the split; check val_fraction and test_fraction")
    run_dir = resolve_path(cfg.project) / cfg.name
    ckpt = run_dir / "last.pt"
    if ckpt.exists() and not resume:
        raise SmearError(f"{run_dir}: run folder exists; pass --resume, or another name=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info("Chula RBC-12: %d train cells (%d images), %d val cells (%d images), %d test images held out",
             len(train_cells), len(split["train"]), len(val_cells), len(split["val"]), len(split["test"]))

    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    classes = MORPHOLOGY_CLASSES
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, cfg.pretrained).to(cfg.device)
    wrapped = ClassifierModel(net, list(classes), cfg.input_size_px, 0.0)
    images = {p: read_image(p) for p in sorted({c.image for c in train_cells})}
    val_crops = eval_point_crops(val_cells, cfg.crop_px, cfg.input_size_px)
    y_val = [c.label for c in val_cells]
    weights = _class_weights([c.label for c in train_cells], cfg.balance_power)
    sample_p = np.array([weights[c.label] for c in train_cells])
    sample_p /= sample_p.sum()
    steps = max(1, cfg.samples_per_epoch // cfg.batch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps * cfg.epochs
    clock = {"start": time.time(), "before": 0.0}

    def progress_of(step: int) -> float:
        """Fraction of training done: steps, or time when a budget is set, whichever is further along."""
        done = step / total
        if cfg.max_minutes:
            done = max(done, (clock["before"] + time.time() - clock["start"]) / (60 * cfg.max_minutes))
        return min(1.0, done)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 4)) * 0.5 * (1 + math.cos(math.pi * progress_of(s))))

    history: list[dict] = []
    best: dict[str, Any] = {"val_macro_f1": -1.0, "epoch": -1, "state": None, "metrics": None}
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint, written below
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        rng.setstate(state["rng"])
        log.info("resumed %s at epoch %d", ckpt, start + 1)
    elapsed0 = sum(h["seconds"] for h in history)
    t_start = time.time()
    clock.update(start=t_start, before=elapsed0)
    bar = _progress(cfg.epochs, start) if progress else None
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        net.train()
        draw = np.random.default_rng(cfg.seed * 1000 + epoch)
        idx = draw.choice(len(train_cells), size=steps * cfg.batch, p=sample_p)
        batches = ([train_cells[i] for i in idx[s * cfg.batch:(s + 1) * cfg.batch]] for s in range(steps))
        train_loss, train_acc = optimise_epoch(
            net, opt, loss_fn,
            ((to_tensor([augmented_point_crop(images[c.image], c, cfg, rng) for c in cells]),
              [classes.index(c.label) for c in cells]) for cells in batches), cfg.device, sched)
        net.eval()
        entry: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss,
                                 "train_accuracy": train_acc}
        if val_cells:
            from .predict import predict_crops

            probs = predict_crops(wrapped, val_crops)
            rep = morphology_report(y_val, probs)
            k = [classes.index(t) for t in y_val]
            binary = rep["normal_vs_abnormal"]
            entry.update({"val_loss": float(-np.log(np.clip(probs[np.arange(len(k)), k], 1e-7, 1)).mean()),
                          "val_accuracy": rep["accuracy"], "val_macro_f1": rep["macro_f1"],
                          "val_normal_vs_abnormal_balanced_accuracy": binary.get("balanced_accuracy")})
        entry["seconds"] = round(time.time() - t0, 1)
        history.append(entry)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        score = entry.get("val_macro_f1", 0.0) if val_cells else float(epoch)
        if score > best["val_macro_f1"]:
            best = {"val_macro_f1": score, "epoch": epoch + 1, "state": copy.deepcopy(net.state_dict()),
                    "metrics": rep if val_cells else None}
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "history": history, "best": best, "rng": rng.getstate()}, ckpt)
        if bar:
            bar.update(1)
        if cfg.max_minutes and progress_of(sched.last_epoch) >= 1.0 and epoch + 1 < cfg.epochs:
            log.info("time limit: %.1f min reached after epoch %d; keeping best epoch %d", cfg.max_minutes,
                     epoch + 1, best["epoch"])
            break
    if bar:
        bar.close()
    net.load_state_dict(best["state"])
    folder = run_dir / "model"
    card = {
        "kind": "morphology", "classes": list(classes), "config": config_to_dict(cfg),
        "data": {"root": str(root), "source": "Chula RBC-12 (MIT)",
                 "images": {s: len(v) for s, v in split.items()},
                 "cells": {"train": len(train_cells), "val": len(val_cells),
                           "test": sum(len(data[i]) for i in split["test"])},
                 "train_counts": _counts(train_cells), "val_counts": _counts(val_cells)},
        "split": {"rule": f"by image id: sha256('chula:{cfg.split_seed}:<id>') -> test < {cfg.test_fraction}, "
                          f"val < {cfg.test_fraction + cfg.val_fraction}, else train",
                  "file": "split.json"},
        "crop": {"training_side_px": cfg.crop_px, "cell_diameter_px": cfg.cell_diameter_px,
                 "inference": "side = crop_px x median RBC box diameter of the field / cell_diameter_px"},
        "best_epoch": best["epoch"], "val_metrics": best["metrics"],
        "train_minutes": round((elapsed0 + time.time() - t_start) / 60, 2),
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
    }
    save_model_folder(folder, net, card)
    (folder / "split.json").write_text(json.dumps(split, indent=1))
    (folder / "history.json").write_text(json.dumps(history, indent=2))
    write_card_md(folder)
    return folder


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="epoch", desc="morphology", leave=False)
    except ImportError:
        return None


# ---------------------------------------------------------------- model folder and inference

@dataclass
class MorphologyModel:
    """A loaded morphology folder; ``annotate`` names the morphology of every RBC of a field."""

    model: Any  # smear.classifier.model.ClassifierModel
    config: dict
    card: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def crop_sides(self, boxes: Sequence[Sequence[float]], all_rbc_boxes: Sequence[Sequence[float]] | None = None,
                   pixel_size_um: float | None = None) -> list[float]:
        """Crop side (field px) per box, matching the training scale (see the module docstring)."""
        crop_px, ref_px = float(self.config["crop_px"]), float(self.config["cell_diameter_px"])
        if pixel_size_um:
            training_um_per_px = RBC_DIAMETER_UM / ref_px
            return [crop_px * training_um_per_px / pixel_size_um] * len(boxes)
        diam = [((b[2] - b[0]) + (b[3] - b[1])) / 2 for b in (all_rbc_boxes if all_rbc_boxes is not None else boxes)]
        if len(diam) >= MIN_RBC_FOR_FIELD_SCALE:
            return [crop_px * float(np.median(diam)) / ref_px] * len(boxes)
        return [crop_px * max(((b[2] - b[0]) + (b[3] - b[1])) / 2, 1.0) / ref_px for b in boxes]

    def classify_boxes(self, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]],
                       pixel_size_um: float | None = None) -> np.ndarray:
        """Class probabilities (N, 13) of RBC boxes (xyxy) of one field."""
        if len(boxes) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        size = int(self.config["input_size_px"])
        crops = [point_crop(image_rgb, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, side, size)
                 for b, side in zip(boxes, self.crop_sides(boxes, None, pixel_size_um))]
        return _predict(self, crops)

    def annotate(self, image_rgb: np.ndarray, cells: Sequence[Any], pixel_size_um: float | None = None) -> None:
        """Set ``cell.morphology = {"label", "score"}`` on every cell whose group is RBC; others untouched."""
        rbc = [c for c in cells if c.group == "RBC"]
        if not rbc:
            return
        probs = self.classify_boxes(image_rgb, [c.box for c in rbc], pixel_size_um)
        for c, pr in zip(rbc, probs):
            k = int(pr.argmax())
            c.morphology = {"label": self.classes[k], "score": round(float(pr[k]), 4)}

    def info(self) -> dict:
        """Weights, classes, crop geometry and the test metrics of the card."""
        test = self.card.get("test_metrics") or {}
        return {"weights": str(self.folder), "classes": self.classes, "backbone": self.config.get("backbone"),
                "input_size_px": self.config.get("input_size_px"), "crop_px": self.config.get("crop_px"),
                "cell_diameter_px": self.config.get("cell_diameter_px"), "date": self.card.get("date"),
                "commit": self.card.get("commit"),
                "test_metrics": {k: test.get(k) for k in ("n", "accuracy", "macro_f1", "normal_vs_abnormal")}
                if test else None}


def resolve_morphology_folder(weights: str | Path | None = None) -> Path:
    """The model folder for ``weights`` (folder or its weights.pt), else the shipped default."""
    from .model import shipped_models_dir

    if weights:
        p = Path(weights)
        folder = p.parent if p.suffix in (".pt", ".pth") else p
    else:
        folder = shipped_models_dir() / DEFAULT_MODEL
    if (folder / "weights.pt").is_file() and (folder / "card.json").is_file():
        return folder
    raise ModelNotFoundError(
        f"RBC morphology model not found (looked for weights.pt and card.json in {folder}); train one with "
        f"'python -m smear.classifier.morphology train', or pass a model folder")


def load_morphology_model(weights: str | None = None, device: str = "cpu") -> MorphologyModel:
    """Load a morphology folder (``weights.pt`` + ``card.json``); ``None`` means the shipped one.

    Raises:
        ModelNotFoundError: no folder there (the message says where it looked and how to make one).
        SmearError: the folder is not a morphology model.
    """
    from .model import ClassifierModel, load_network

    folder = resolve_morphology_folder(weights)
    card = json.loads((folder / "card.json").read_text())
    if card.get("kind") != "morphology":
        raise SmearError(f"{folder}: card.json kind is {card.get('kind')!r}, not 'morphology'; "
                         f"pass an RBC morphology model folder")
    cfg = card["config"]
    net = load_network(folder, card, device)
    model = ClassifierModel(net=net, classes=list(card["classes"]), crop_size_px=int(cfg["input_size_px"]),
                            crop_margin=0.0, card=card, folder=folder)
    return MorphologyModel(model=model, config=cfg, card=card, folder=folder)


# ---------------------------------------------------------------- evaluation

def evaluate_morphology(folder: str | Path | None, split: str = "test", output: str | Path | None = None,
                        data_root: str | Path | None = None, record: bool = False) -> dict:
    """Score a morphology folder on one of its own Chula splits (``split.json``).

    Writes ``metrics.json``, ``confusion_matrix.png`` and ``predictions.csv`` (one row per cell;
    every figure is computed from it) to ``output``. ``record=True`` stores the result in the
    folder's card as ``{split}_metrics`` and rewrites ``card.md``.
    """
    from smear.configs.paths import resolve_path

    from .evaluate import plot_confusion

    model = load_morphology_model(str(folder) if folder else None)
    if split not in SPLITS:
        raise SmearError(f"split {split!r}: valid splits are {', '.join(SPLITS)}")
    split_file = model.folder / "split.json"
    if not split_file.is_file():
        raise SmearError(f"{split_file}: missing; the folder does not say which images it was trained on")
    ids = json.loads(split_file.read_text())[split]
    root = resolve_path(data_root or model.config["data_root"])
    data = read_chula(root)
    missing = [i for i in ids if i not in data]
    if missing:
        raise SmearError(f"{root}: {len(missing)} {split} images of the split are missing (e.g. {missing[0]})")
    cells = [c for i in ids for c in data[i]]
    crops = eval_point_crops(cells, float(model.config["crop_px"]), int(model.config["input_size_px"]))
    probs = _predict(model, crops)
    rep = morphology_report([c.label for c in cells], probs, model.classes)
    rep.update({"split": split, "images": len(ids), "weights": str(model.folder), "data_root": str(root)})
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(rep, indent=2))
        plot_confusion(rep["confusion_matrix"], out / "confusion_matrix.png", f"RBC morphology, Chula {split} split")
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "x", "y", "true", "pred", "score", "p_normal"])
            k_normal = model.classes.index(NORMAL)
            for c, pr in zip(cells, probs):
                k = int(pr.argmax())
                w.writerow([c.image_id, c.x, c.y, c.label, model.classes[k], round(float(pr[k]), 4),
                            round(float(pr[k_normal]), 4)])
    if record:
        card = dict(model.card)
        card[f"{split}_metrics"] = rep
        (model.folder / "card.json").write_text(json.dumps(card, indent=2))
        write_card_md(model.folder)
    return rep


def write_card_md(folder: Path) -> None:
    """A short human-readable card (data, split, config, metrics, date) from ``card.json``."""
    card = json.loads((folder / "card.json").read_text())
    cfg, data = card["config"], card.get("data", {})
    lines = ["# RBC morphology model (Chula RBC-12, 13 classes)", "",
             f"Date {card.get('date')}, commit {card.get('commit')}; trained {card.get('train_minutes')} min, "
             f"best epoch {card.get('best_epoch')} of {cfg.get('epochs')}.", "",
             "## Data", f"{data.get('source', 'Chula RBC-12')} at `{cfg.get('data_root')}`; labelled images per split "
             f"{data.get('images')}, cells {data.get('cells')}.",
             f"Train cells per class: {data.get('train_counts')}.", "",
             "## Split", f"{card.get('split', {}).get('rule')}. Image lists: `split.json`. Test images are used only "
             "by `evaluate`.", "",
             "## Config",
             f"{cfg.get('backbone')} ({cfg.get('pretrained')} init), crop {cfg.get('crop_px')} px around the point "
             f"(cells about {cfg.get('cell_diameter_px')} px) resized to {cfg.get('input_size_px')} px; "
             f"{cfg.get('epochs')} epochs x {cfg.get('samples_per_epoch')} crops, batch {cfg.get('batch')}, "
             f"AdamW lr {cfg.get('lr')} cosine, class weighting power {cfg.get('balance_power')}, "
             "rotation/flip/zoom/stain jitter. Full values in `card.json`.",
             "At inference: crop side = crop_px x the field's median RBC box diameter / cell_diameter_px.", ""]
    for split in ("val", "test"):
        m = card.get(f"{split}_metrics")
        if not m:
            continue
        b = m.get("normal_vs_abnormal", {})
        lines += [f"## {split.capitalize()} metrics ({m.get('n')} cells)",
                  f"accuracy {m.get('accuracy')}, 13-class macro-F1 {m.get('macro_f1')}; normal vs abnormal "
                  f"(uncategorised left out, n={b.get('n')}): balanced accuracy {b.get('balanced_accuracy')}, "
                  f"ROC AUC {b.get('roc_auc')}, sensitivity {b.get('sensitivity')}, "
                  f"specificity {b.get('specificity')}.", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                  for c, v in m["per_class"].items()]
        lines.append("")
    cov = card.get("detector_coverage")
    if cov:
        lines += ["## Do the RBCs reach this model? (detector on Chula fields)",
                  f"{cov.get('detector')} at scale {cov.get('scale')}: {cov.get('found')} of the labelled cells of the "
                  f"{cov.get('images')} held-out test images ({cov.get('cells')} cells) fall inside a detected RBC "
                  f"({cov.get('before')}). Reproduce: `{cov.get('reproduce')}`.", ""]
    lines += ["## Limits", "Trained on one laboratory's stain and microscope (Chula, 1000x); other sources shift "
              "colour and scale, so treat calls as hints. Images are split by image, not by patient (the data "
              "names no patient), so cells of one smear can sit on both sides; elliptocytes come from a separate "
              "batch of 32 images, which likely makes them easy to tell apart. Morphology hints are not anemia, "
              "which is defined by haemoglobin.", "",
              "Files: `weights.pt` (fp16 state dict), `card.json`, `split.json`, `history.json`; a confusion "
              "matrix PNG when evaluated.", ""]
    (folder / "card.md").write_text("\n".join(lines))










# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m smear.classifier.morphology train|evaluate``: parse, call one function, print."""
    from smear.configs.loader import load_config, parse_overrides

    ap = argparse.ArgumentParser(
        prog="python -m smear.classifier.morphology",
        description="RBC morphology stage (Chula RBC-12). Examples:\n"
                    "  python -m smear.classifier.morphology train threads=1\n"
                    "  python -m smear.classifier.morphology train name=try2 max_minutes=10\n"
                    "  python -m smear.classifier.morphology evaluate runs/morphology/chula/model --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train on Chula RBC-12 (key=value overrides)")
    tr.add_argument("overrides", nargs="*", help="config overrides, e.g. epochs=6 name=try1")
    tr.add_argument("--config", help="YAML file (e.g. configs/morphology.yaml)")
    tr.add_argument("--resume", action="store_true", help="continue project/name/last.pt")
    ev = sub.add_parser("evaluate", help="score a model folder on its held-out Chula split")
    ev.add_argument("weights", nargs="?", help="model folder; default: the shipped one")
    ev.add_argument("--split", default="test", choices=SPLITS)
    ev.add_argument("--output", help="folder for metrics.json, confusion_matrix.png, predictions.csv")
    ev.add_argument("--data-root", help="Chula RBC-12 folder, if not the one in the card")
    ev.add_argument("--record", action="store_true", help="store the metrics in the folder's card.json / card.md")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.command == "train":
            cfg = load_config(MorphologyConfig, args.config, parse_overrides(args.overrides))
            print(train_morphology(cfg, resume=args.resume))
        else:
            rep = evaluate_morphology(args.weights, args.split, args.output, args.data_root, args.record)
            b = rep["normal_vs_abnormal"]
            print(f"{args.split}: {rep['n']} cells in {rep['images']} images; accuracy {rep['accuracy']}, "
                  f"macro-F1 {rep['macro_f1']}; normal vs abnormal balanced accuracy {b.get('balanced_accuracy')}, "
                  f"ROC AUC {b.get('roc_auc')}")
            for c, v in rep["per_class"].items():
                print(f"  {c:<14} P {v['precision']:.3f}  R {v['recall']:.3f}  F1 {v['f1']:.3f}  n {v['support']}")
    except SmearError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
