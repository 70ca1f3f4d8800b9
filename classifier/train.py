"""Train the crop classifier: the study's two-phase transfer-learning recipe, with class weighting."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smear.configs.errors import SmearError
from smear.configs.loader import config_to_dict, dump_config
from smear.configs.paths import git_commit, resolve_path
from smear.data.taxonomy import CELL_CLASSES, SUBTYPES

from .config import ClassifierConfig
from .model import CellClassifier, save_model_folder
from .predict import predict_crops, to_tensor

log = logging.getLogger(__name__)


@dataclass
class CropRow:
    """One labelled box of the manifest."""

    image: str
    box: tuple[float, float, float, float]
    label: str
    split: str
    image_id: str


def read_manifest(path: Path, classes: tuple[str, ...] = CELL_CLASSES) -> list[CropRow]:
    """Rows of a crop manifest whose label is one of ``classes`` (plain 'WBC' rows are left out)."""
    if not path.is_file():
        raise SmearError(f"{path}: crop manifest not found; make it with 'smear data prepare'")
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["label"] in classes:
                rows.append(CropRow(r["source_image"], (float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"])),
                                    r["label"], r["split"], r.get("image_id") or r["source_image"]))
    return rows


class ImageCache:
    """Source fields decoded once (RGB), shared by all crops of an image."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        if path not in self._images:
            from smear.data.images import read_image

            self._images[path] = read_image(path)
        return self._images[path]


def augmented_crop(image: np.ndarray, box: tuple[float, float, float, float], cfg: ClassifierConfig,
                   rng: random.Random) -> np.ndarray:
    """A training crop: jittered margin, centre, zoom, any-angle rotation, flips, stain jitter."""
    import cv2

    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-1, 1) * cfg.center_jitter * bw
    cy = (y1 + y2) / 2 + rng.uniform(-1, 1) * cfg.center_jitter * bh
    margin = max(0.0, cfg.crop_margin + rng.uniform(-1, 1) * cfg.margin_jitter)
    side = max(bw, bh, 1.0) * (1 + 2 * margin) * (1 + rng.uniform(-1, 1) * cfg.zoom)
    size = cfg.crop_size_px
    angle = rng.uniform(0, 360) if cfg.rotate else 0.0
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    m[0, 2] += size / 2 - cx
    m[1, 2] += size / 2 - cy
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if cfg.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return stain_jitter(crop, cfg.hue_jitter, cfg.saturation_jitter, cfg.brightness_jitter, rng)


def stain_jitter(crop: np.ndarray, hue: float, saturation: float, brightness: float, rng: random.Random) -> np.ndarray:
    """Random stain hue / saturation shift, brightness and contrast change of an RGB uint8 crop."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-1, 1) * hue * 180) % 180
    hsv[..., 1] *= 1 + rng.uniform(-1, 1) * saturation
    hsv[..., 2] *= 1 + rng.uniform(-1, 1) * brightness
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    contrast = 1 + rng.uniform(-1, 1) * brightness * 0.5
    out = (out - out.mean()) * contrast + out.mean()
    return np.clip(out, 0, 255).astype(np.uint8)


def eval_crops(rows: list[CropRow], cache: ImageCache, size: int, margin: float) -> list[np.ndarray]:
    from smear.data.crops import crop_cell

    return [crop_cell(cache.get(r.image), r.box, margin, size) for r in rows]


def class_weights(labels: list[str], classes: tuple[str, ...], power: float) -> dict[str, float]:
    """Per-class sampling weight proportional to count^-power (0 natural, 1 balanced)."""
    counts = {c: max(1, sum(1 for lab in labels if lab == c)) for c in classes}
    return {c: counts[c] ** -power for c in classes}


def _epoch_metrics(probs: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> dict:
    from smear.data.taxonomy import SUBTYPES

    pred = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)).mean()) if len(y) else float("nan")
    sub = [classes.index(c) for c in SUBTYPES if c in classes]
    mask = np.isin(y, sub)
    recalls = [float((pred[y == k] == k).mean()) for k in sub if (y == k).any()]
    return {"loss": loss, "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "subtype_accuracy": float((pred[mask] == y[mask]).mean()) if mask.any() else float("nan"),
            "subtype_balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan")}


def optimise_epoch(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, batches, device: str,
                   sched=None) -> tuple[float, float]:
    """One epoch of optimisation steps over ``(inputs, label indices)`` batches; returns (mean loss, accuracy)."""
    run_loss, run_correct, seen = 0.0, 0, 0
    for x, labels in batches:
        x = x.to(device)
        y = torch.tensor(labels, device=device)
        logits = net(x)
        loss = loss_fn(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        run_loss += loss.item() * len(y)
        run_correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return run_loss / max(seen, 1), run_correct / max(seen, 1)


def model_classes(cfg: ClassifierConfig) -> tuple[str, ...]:
    """The classes a model trained with ``cfg`` names."""
    return SUBTYPES if cfg.classes == "subtypes" else CELL_CLASSES


def train_classifier(cfg: ClassifierConfig, resume: bool = False, train_rows: list[CropRow] | None = None,
                     val_rows: list[CropRow] | None = None, progress: bool = True) -> Path:
    """Train and write a model folder (``weights.pt``, ``card.json``, ``history.json``) under project/name.

    ``last.pt`` (model, optimiser, history) is written every epoch; ``resume=True`` continues it.
    ``train_rows``/``val_rows`` override the manifest splits (cross-validation).
    """
    torch.set_num_threads(cfg.threads)
    classes = model_classes(cfg)
    if train_rows is None:
        rows = read_manifest(resolve_path(cfg.manifest), classes)
        want = ("train", "val") if cfg.train_split == "trainval" else ("train",)
        train_rows = [r for r in rows if r.split in want]
        val_rows = [r for r in rows if r.split == "val"] if cfg.val_split == "val" and cfg.train_split != "trainval" else []
    val_rows = val_rows or []
    if not train_rows:
        raise SmearError("no training crops: check the manifest's split and label columns")
    overlap = {r.image_id for r in train_rows} & {r.image_id for r in val_rows}
    if overlap:
        raise SmearError(f"{len(overlap)} source images have crops in both train and val (e.g. {sorted(overlap)[0]}); "
                         f"split by image")
    run_dir = resolve_path(cfg.project) / cfg.name
    ckpt = run_dir / "last.pt"
    if run_dir.exists() and not resume and ckpt.exists():
        raise SmearError(f"{run_dir}: run folder exists; pass --resume, or another name=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    cache = ImageCache()
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, cfg.pretrained).to(cfg.device)
    y_val = np.array([classes.index(r.label) for r in val_rows])
    val_crops = eval_crops(val_rows, cache, cfg.crop_size_px, cfg.crop_margin) if val_rows else []
    weights = class_weights([r.label for r in train_rows], classes, cfg.balance_power)
    sample_w = np.array([weights[r.label] for r in train_rows])
    sample_p = sample_w / sample_w.sum()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    total_epochs = cfg.frozen_epochs + cfg.epochs

    def make_optimizer(phase: int) -> torch.optim.Optimizer:
        if phase == 1:
            net.freeze_backbone(0.0)
            return torch.optim.AdamW(net.head.parameters(), lr=cfg.lr_head, weight_decay=cfg.weight_decay)
        net.freeze_backbone(cfg.unfreeze_fraction)
        return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)

    history: list[dict] = []
    best = {"val_loss": math.inf, "epoch": -1, "state": None}
    start_epoch = 0
    phase = 1 if cfg.frozen_epochs > 0 else 2
    opt = make_optimizer(phase)
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint, written below
        net.load_state_dict(state["model"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best = state["best"]
        phase = 1 if start_epoch < cfg.frozen_epochs else 2
        opt = make_optimizer(phase)
        opt.load_state_dict(state["optimizer"]) if state["phase"] == phase else None
        rng.setstate(state["rng"])
        log.info("resumed %s at epoch %d", ckpt, start_epoch + 1)
    t_start = time.time() - sum(h.get("seconds", 0) for h in history)
    steps = max(1, cfg.samples_per_epoch // cfg.batch)
    for epoch in range(start_epoch, total_epochs):
        if epoch == cfg.frozen_epochs and phase == 1:
            phase = 2
            opt = make_optimizer(2)
        t0 = time.time()
        net.train()
        net.set_frozen_bn_eval()
        idx = np.random.default_rng(cfg.seed + epoch).choice(len(train_rows), size=steps * cfg.batch, p=sample_p)
        batches = ([train_rows[i] for i in idx[s * cfg.batch:(s + 1) * cfg.batch]] for s in range(steps))
        train_loss, train_acc = optimise_epoch(
            net, opt, loss_fn,
            ((to_tensor([augmented_crop(cache.get(r.image), r.box, cfg, rng) for r in rows]),
              [classes.index(r.label) for r in rows]) for rows in batches), cfg.device)
        net.eval()
        entry = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "train_accuracy": train_acc}
        if val_rows:
            from .model import ClassifierModel

            probs = predict_crops(ClassifierModel(net, list(classes), cfg.crop_size_px, cfg.crop_margin), val_crops)
            entry.update({f"val_{k}": v for k, v in _epoch_metrics(probs, y_val, classes).items()})
        entry["seconds"] = round(time.time() - t0, 1)
        history.append(entry)
        if progress:
            log.info("epoch %d/%d %s", epoch + 1, total_epochs,
                     " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        improved = val_rows and entry["val_loss"] < best["val_loss"] - 1e-4
        if phase == 2 and (improved or not val_rows):
            best = {"val_loss": entry.get("val_loss", math.nan), "epoch": epoch + 1,
                    "state": copy.deepcopy(net.state_dict())}
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "phase": phase,
                    "history": history, "best": best, "rng": rng.getstate()}, ckpt)
        if phase == 2 and val_rows and best["epoch"] > 0 and epoch + 1 - best["epoch"] >= cfg.patience:
            log.info("early stop: val loss has not improved for %d epochs (best epoch %d)", cfg.patience, best["epoch"])
            break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    minutes = (time.time() - t_start) / 60
    card = {
        "kind": "classifier", "classes": list(classes), "config": config_to_dict(cfg),
        "data": {"manifest": str(resolve_path(cfg.manifest)), "train_crops": len(train_rows), "val_crops": len(val_rows),
                 "train_images": len({r.image_id for r in train_rows}), "val_images": len({r.image_id for r in val_rows}),
                 "train_counts": {c: sum(1 for r in train_rows if r.label == c) for c in classes}},
        "split": f"train on '{cfg.train_split}', choose on '{cfg.val_split}' (by source image; test never used)",
        "best_epoch": best["epoch"], "train_minutes": round(minutes, 2),
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
    }
    save_model_folder(run_dir / "model", net, card)
    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    (run_dir / "model" / "history.json").write_text(json.dumps(history, indent=2))
    try:
        from .evaluate import plot_history

        plot_history(history, run_dir / "model" / "curves.png")
    except Exception as e:  # noqa: BLE001  a plot failure must not lose a trained model
        log.warning("training curves not plotted: %s", e)
    return run_dir / "model"


def package_classifier(model_folder: Path, dest: Path, extra: dict | None = None) -> Path:
    """Copy a trained model folder to ``dest`` (e.g. the shipped models folder) with its card (json + md)."""
    import shutil

    from smear.configs.modelcard import write_card

    model_folder = Path(model_folder)
    card = json.loads((model_folder / "card.json").read_text())
    card.update(extra or {})
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("weights.pt", "history.json", "curves.png"):
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, dest / name)
    write_card(dest, card, f"Classifier {dest.name}")
    return dest
