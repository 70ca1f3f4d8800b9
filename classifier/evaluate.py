"""Evaluate a classifier of any task: one report (accuracy, per-class P/R/F1, confusion matrix, ROC/AUC and the
task's own figures), one set of outputs (metrics.json, plots, one prediction row per cell)."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from smear.configs.errors import SmearError
from smear.configs.paths import resolve_path
from smear.data.taxonomy import GROUPS, NORMAL, SUBTYPES, UNCATEGORISED, group_of

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_MANIFEST = "runs/prepared/bccd/crops/manifest.csv"


def _r(v: float) -> float:
    return round(float(v), 4)


def _prf(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {c: {"precision": _r(p[i]), "recall": _r(r[i]), "f1": _r(f[i]), "support": int(s[i])}
            for i, c in enumerate(labels)}


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str],
                          probs: np.ndarray | None = None) -> dict:
    """Metrics of one labelled prediction set, as a JSON-ready dict (figures to 4 decimals).

    Every task: ``n``, ``accuracy``, ``balanced_accuracy`` and ``macro_f1`` (over the classes with
    support), ``per_class`` P/R/F1, ``confusion_matrix``, and with ``probs`` one-vs-rest ROC AUC.
    Cell classes add the WBC-subtype figures and the 3-group collapse (RBC / WBC / Platelets);
    morphology classes add normal vs abnormal, which leaves out cells whose truth is
    ``uncategorised`` (neither a named abnormality nor normal): the call is argmax != normal, the
    score 1 - p(normal).
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y_true, y_pred, classes = list(y_true), list(y_pred), list(classes)
    present = [c for c in classes if c in y_true or c in y_pred]
    per_class = _prf(y_true, y_pred, present) if present else {}
    supported = [c for c in present if per_class[c]["support"] > 0]
    out: dict = {
        "n": len(y_true),
        "accuracy": _r(np.mean([a == b for a, b in zip(y_true, y_pred)])) if y_true else None,
        "balanced_accuracy": _r(np.mean([per_class[c]["recall"] for c in supported])) if supported else None,
        "macro_f1": _r(np.mean([per_class[c]["f1"] for c in supported])) if supported else None,
        "per_class": per_class,
        "confusion_matrix": {"labels": present,
                             "matrix": confusion_matrix(y_true, y_pred, labels=present).tolist() if present else []},
    }
    sub = [i for i, t in enumerate(y_true) if t in SUBTYPES]
    if sub:
        st = [y_true[i] for i in sub]
        sp = [y_pred[i] for i in sub]
        sub_present = [c for c in SUBTYPES if c in st]
        rec = {c: _r(np.mean([b == c for a, b in zip(st, sp) if a == c])) for c in sub_present}
        out["subtype"] = {"n": len(sub), "accuracy": _r(np.mean([a == b for a, b in zip(st, sp)])),
                          "balanced_accuracy": _r(np.mean(list(rec.values()))), "recall": rec,
                          "support": {c: st.count(c) for c in sub_present}}
    if y_true and all(group_of(c) in GROUPS for c in classes):
        gt = [group_of(c) for c in y_true]
        gp = [group_of(c) for c in y_pred]
        out["groups"] = {"accuracy": _r(np.mean([a == b for a, b in zip(gt, gp)])),
                         "per_class": _prf(gt, gp, list(GROUPS)),
                         "confusion_matrix": {"labels": list(GROUPS),
                                              "matrix": confusion_matrix(gt, gp, labels=list(GROUPS)).tolist()}}
    if NORMAL in classes:
        out["normal_vs_abnormal"] = _normal_vs_abnormal(y_true, y_pred, classes, probs)
    if probs is not None and len(y_true):
        auc = {}
        for k, c in enumerate(classes):
            yt = np.array([t == c for t in y_true])
            if 0 < yt.sum() < len(yt):
                auc[c] = _r(roc_auc_score(yt, probs[:, k]))
        out["roc_auc_ovr"] = auc
    return out


def _normal_vs_abnormal(y_true: list[str], y_pred: list[str], classes: list[str], probs: np.ndarray | None) -> dict:
    from sklearn.metrics import roc_auc_score

    keep = [i for i, t in enumerate(y_true) if t != UNCATEGORISED]
    yt = np.array([y_true[i] != NORMAL for i in keep], bool)
    yp = np.array([y_pred[i] != NORMAL for i in keep], bool)
    out = {"n": len(keep), "n_abnormal": int(yt.sum()), "n_normal": int((~yt).sum()),
           "left_out_uncategorised": len(y_true) - len(keep)}
    if yt.any() and (~yt).any():
        sens, spec = float(yp[yt].mean()), float((~yp[~yt]).mean())
        out.update({"sensitivity": _r(sens), "specificity": _r(spec), "balanced_accuracy": _r((sens + spec) / 2)})
        if probs is not None:
            out["roc_auc"] = _r(roc_auc_score(yt, 1 - probs[keep, classes.index(NORMAL)]))
    return out


def epoch_metrics(probs: np.ndarray, y_true: Sequence[str], classes: Sequence[str]) -> tuple[dict, dict]:
    """``(headline figures, full report)`` of a validation pass, for the training history and model choice.

    The headline: loss (cross-entropy of the true class), accuracy, balanced accuracy, macro-F1, and
    the task's own figures (WBC-subtype accuracy, normal-vs-abnormal balanced accuracy).
    """
    classes = list(classes)
    k = np.array([classes.index(t) for t in y_true], int)
    loss = float(-np.log(np.clip(probs[np.arange(len(k)), k], 1e-7, 1)).mean()) if len(k) else float("nan")
    rep = classification_report(y_true, [classes[i] for i in probs.argmax(1)], classes, probs)
    head = {"loss": loss, **{key: rep[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}}
    if "subtype" in rep:
        head.update(subtype_accuracy=rep["subtype"]["accuracy"],
                    subtype_balanced_accuracy=rep["subtype"]["balanced_accuracy"])
    if "balanced_accuracy" in rep.get("normal_vs_abnormal", {}):
        head["normal_vs_abnormal_balanced_accuracy"] = rep["normal_vs_abnormal"]["balanced_accuracy"]
    return head, rep


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: dict, path: Path, title: str) -> None:
    plt = _pyplot()
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
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
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
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", axes[0]), ("accuracy", axes[1])):
        ax.plot(ep, [h[f"train_{key}"] for h in history], label=f"train {key}")
        if history and f"val_{key}" in history[0]:
            ax.plot(ep, [h[f"val_{key}"] for h in history], label=f"val {key}")
        for extra, label in (("val_subtype_accuracy", "val WBC subtype accuracy"), ("val_macro_f1", "val macro-F1")):
            if key == "accuracy" and history and history[0].get(extra) is not None:
                ax.plot(ep, [h[extra] for h in history], label=label)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- evaluation of a model folder

def predict_rows(model, rows, batch: int = 256, image_transform=None) -> np.ndarray:
    """Probabilities for manifest rows (ground-truth boxes), through the same path as the pipeline;
    ``image_transform`` is applied to each source field first (e.g. a stain normalisation)."""
    from smear.data.crops import ImageCache

    from .predict import classify_fields

    cache = ImageCache(image_transform)
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


def write_evaluation(output: Path, rep: dict, y_true: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                     where: list[dict], title: str, folder: Path | None = None) -> None:
    """``metrics.json``, confusion matrices, ROC curves, ``predictions.csv`` (one row per cell, ``where`` it
    is first; every figure can be recomputed from it) and the training curves of ``folder``."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(rep, indent=2))
    plot_confusion(rep["confusion_matrix"], output / "confusion_matrix.png", title)
    if "groups" in rep:
        plot_confusion(rep["groups"]["confusion_matrix"], output / "confusion_matrix_groups.png", f"3 groups, {title}")
    plot_roc(y_true, probs, classes, output / "roc.png")
    k_normal = list(classes).index(NORMAL) if NORMAL in classes else None
    with open(output / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        extra = ["p_normal"] if k_normal is not None else []
        w.writerow([*(where[0] if where else {}), "true", "pred", "score", *extra])
        for at, t, pr in zip(where, y_true, probs):
            k = int(pr.argmax())
            w.writerow([*at.values(), t, classes[k], round(float(pr[k]), 4)]
                       + ([round(float(pr[k_normal]), 4)] if k_normal is not None else []))
    hist = folder / "history.json" if folder else None
    if hist and hist.is_file():
        plot_history(json.loads(hist.read_text()), output / "curves.png")


def evaluate_classifier(weights: str | Path | None, manifest: str | Path, split: str, output: Path | None = None,
                        batch: int = 256) -> dict:
    """Score a cells or wbc-subtypes classifier on the ground-truth boxes of a manifest split."""
    from smear.data.crops import read_manifest

    from .model import load_classifier

    model = load_classifier(weights)
    rows = [r for r in read_manifest(resolve_path(manifest), tuple(model.classes)) if r.split == split]
    if not rows:
        raise SmearError(f"{manifest}: no labelled crops in split '{split}'")
    probs = predict_rows(model, rows, batch)
    y_true = [r.label for r in rows]
    rep = classification_report(y_true, [model.classes[k] for k in probs.argmax(1)], model.classes, probs)
    rep.update({"split": split, "weights": str(model.folder), "backbone": model.card["config"]["backbone"],
                "crop_size_px": model.crop_size_px})
    if output is not None:
        where = [{"image_id": r.image_id, "x1": r.box[0], "y1": r.box[1], "x2": r.box[2], "y2": r.box[3]} for r in rows]
        write_evaluation(Path(output), rep, y_true, probs, model.classes, where, f"classifier, {split} split",
                         model.folder)
    return rep


def evaluate_morphology(weights: str | Path | None, split: str = "test", output: str | Path | None = None,
                        data_root: str | Path | None = None) -> dict:
    """Score an RBC morphology folder on one of its own Chula splits (its ``split.json``)."""
    from smear.data.chula import read_chula
    from smear.data.crops import ImageCache

    from .predict import load_morphology_model, predict_crops

    model = load_morphology_model(weights)
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
    cache = ImageCache()
    side = float(model.config["cut_side_px"])  # the training scale: Chula fields are the training fields
    cells = [c for i in ids for c in data[i]]
    probs = predict_crops(model.model, [model.crop(cache.get(c.image), c.x, c.y, side) for c in cells])
    y_true = [c.label for c in cells]
    rep = classification_report(y_true, [model.classes[k] for k in probs.argmax(1)], model.classes, probs)
    rep.update({"split": split, "images": len(ids), "weights": str(model.folder), "data_root": str(root)})
    if output is not None:
        write_evaluation(Path(output), rep, y_true, probs, model.classes,
                         [{"image_id": c.image_id, "x": c.x, "y": c.y} for c in cells],
                         f"RBC morphology, Chula {split} split", model.folder)
    return rep


def evaluate(weights: str | Path | None = None, split: str = "test", output: str | Path | None = None, *,
             task: str | None = None, manifest: str | Path = DEFAULT_MANIFEST, data_root: str | Path | None = None,
             write_card: bool = False) -> dict:
    """Evaluate a model folder of any task (``None``: the folder's own, from its card; no folder: cells).

    ``write_card=True`` stores the report in the folder's card as ``<split>_metrics`` (with date and
    commit) and re-renders ``card.md``.

    Example:
        >>> rep = evaluate(None, "test", task="rbc-morphology")
    """
    from .config import TASKS
    from .model import read_card, resolve_classifier_folder, resolve_morphology_folder, write_model_card

    if task is not None and task not in TASKS:
        raise SmearError(f"task={task!r}: valid tasks are {', '.join(TASKS)}")
    if task is None:
        card = json.loads((resolve_classifier_folder(weights) / "card.json").read_text()) if weights else {}
        task = card.get("task") or ("rbc-morphology" if card.get("kind") == "morphology" else "cells")
    if task == "rbc-morphology":
        folder = resolve_morphology_folder(weights)
        rep = evaluate_morphology(folder, split, output, data_root)
    else:
        folder = resolve_classifier_folder(weights, task)
        rep = evaluate_classifier(folder, manifest, split, Path(output) if output else None)
    if write_card:
        from smear.configs.paths import git_commit

        card = read_card(folder, "morphology" if task == "rbc-morphology" else "classifier")
        card[f"{split}_metrics"] = {**rep, "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}
        write_model_card(folder, card)
    return rep

