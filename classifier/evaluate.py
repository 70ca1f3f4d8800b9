"""Evaluate the crop classifier: accuracy, per-class P/R/F1, confusion matrix, ROC/AUC, curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from smear.configs.errors import SmearError
from smear.configs.paths import resolve_path
from smear.data.taxonomy import SUBTYPES, group_of

log = logging.getLogger(__name__)


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str],
                          probs: np.ndarray | None = None) -> dict:
    """Metrics of one labelled prediction set, as a JSON-ready dict.

    Includes the 3-group collapse (RBC / WBC / Platelets) and the WBC-subtype figures.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true, y_pred = list(y_true), list(y_pred)
    classes = list(classes)
    present = [c for c in classes if c in y_true or c in y_pred]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    out: dict = {
        "n": len(y_true),
        "accuracy": float(np.mean([a == b for a, b in zip(y_true, y_pred)])) if y_true else float("nan"),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(present)},
        "confusion_matrix": {"labels": present,
                             "matrix": confusion_matrix(y_true, y_pred, labels=present).tolist()},
    }
    recalls = [out["per_class"][c]["recall"] for c in present if out["per_class"][c]["support"] > 0]
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")
    sub = [i for i, t in enumerate(y_true) if t in SUBTYPES]
    if sub:
        st = [y_true[i] for i in sub]
        sp = [y_pred[i] for i in sub]
        sub_present = [c for c in SUBTYPES if c in st]
        rec = {c: float(np.mean([b == c for a, b in zip(st, sp) if a == c])) for c in sub_present}
        out["subtype"] = {"n": len(sub), "accuracy": float(np.mean([a == b for a, b in zip(st, sp)])),
                          "balanced_accuracy": float(np.mean(list(rec.values()))), "recall": rec,
                          "support": {c: st.count(c) for c in sub_present}}
    gt = [group_of(c) for c in y_true]
    gp = [group_of(c) for c in y_pred]
    groups = ["RBC", "WBC", "Platelets"]
    gp_, gr_, gf_, gs_ = precision_recall_fscore_support(gt, gp, labels=groups, zero_division=0)
    out["groups"] = {"accuracy": float(np.mean([a == b for a, b in zip(gt, gp)])) if gt else float("nan"),
                     "per_class": {g: {"precision": float(gp_[i]), "recall": float(gr_[i]), "f1": float(gf_[i]),
                                       "support": int(gs_[i])} for i, g in enumerate(groups)},
                     "confusion_matrix": {"labels": groups, "matrix": confusion_matrix(gt, gp, labels=groups).tolist()}}
    if probs is not None and len(y_true):
        auc = {}
        for k, c in enumerate(classes):
            yt = np.array([t == c for t in y_true])
            if 0 < yt.sum() < len(yt):
                auc[c] = float(roc_auc_score(yt, probs[:, k]))
        out["roc_auc_ovr"] = auc
    return out


def plot_confusion(cm: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = cm["labels"], np.array(cm["matrix"])
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y_true: Sequence[str], probs: np.ndarray, classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    for k, c in enumerate(classes):
        yt = np.array([t == c for t in y_true])
        if 0 < yt.sum() < len(yt):
            fpr, tpr, _ = roc_curve(yt, probs[:, k])
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f}, n={int(yt.sum())})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", axes[0]), ("accuracy", axes[1])):
        ax.plot(ep, [h[f"train_{key}"] for h in history], label=f"train {key}")
        if history and f"val_{key}" in history[0]:
            ax.plot(ep, [h[f"val_{key}"] for h in history], label=f"val {key}")
        if key == "accuracy" and history and "val_subtype_accuracy" in history[0]:
            ax.plot(ep, [h["val_subtype_accuracy"] for h in history], label="val WBC subtype accuracy")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predict_rows(model, rows, batch: int = 256) -> np.ndarray:
    """Probabilities for manifest rows (ground-truth boxes), through the same path as the pipeline."""
    from .predict import classify_fields
    from .train import ImageCache

    cache = ImageCache()
    order: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        order.setdefault(r.image, []).append(k)
    images = list(order)
    per_image = classify_fields(model, [cache.get(p) for p in images],
                                [[rows[k].box for k in order[p]] for p in images], batch)
    probs = np.zeros((len(rows), len(model.classes)), np.float32)
    for p, pr in zip(images, per_image):
        probs[order[p]] = pr
    return probs


def evaluate_classifier(weights: str | Path | None, manifest: str | Path, split: str, output: Path | None = None,
                        batch: int = 256) -> dict:
    """Score a classifier on the ground-truth boxes of a manifest split; write JSON and PNGs to ``output``."""
    from .model import load_classifier
    from .train import read_manifest

    model = load_classifier(weights)
    rows = [r for r in read_manifest(resolve_path(manifest), tuple(model.classes)) if r.split == split]
    if not rows:
        raise SmearError(f"{manifest}: no labelled crops in split '{split}'")
    probs = predict_rows(model, rows, batch)
    y_true = [r.label for r in rows]
    y_pred = [model.classes[k] for k in probs.argmax(1)]
    rep = classification_report(y_true, y_pred, model.classes, probs)
    rep.update({"split": split, "weights": str(model.folder), "backbone": model.card["config"]["backbone"],
                "crop_size_px": model.crop_size_px})
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(rep, indent=2))
        plot_confusion(rep["confusion_matrix"], output / "confusion_matrix.png", f"classifier, {split} split")
        plot_confusion(rep["groups"]["confusion_matrix"], output / "confusion_matrix_groups.png",
                       f"3 groups, {split} split")
        plot_roc(y_true, probs, model.classes, output / "roc.png")
        import csv

        with open(output / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "x1", "y1", "x2", "y2", "true", "pred", "score"])
            for r, t, pr in zip(rows, y_true, probs):
                w.writerow([r.image_id, *r.box, t, model.classes[int(pr.argmax())], round(float(pr.max()), 4)])
        hist = model.folder / "history.json" if model.folder else None
        if hist and hist.is_file():
            plot_history(json.loads(hist.read_text()), output / "curves.png")
    return rep
