"""Train a classifier of any task with one loop: class-weighted sampling of augmented crops, optional frozen
first phase, optional cosine schedule and time budget, best epoch chosen on val, checkpoint every epoch.

Tasks: ``cells`` and ``wbc-subtypes`` (the study's two-phase transfer-learning recipe on the BCCD crop
manifest) and ``rbc-morphology`` (all layers, cosine schedule and a time budget, on Chula RBC-12 points).
Training crops are cut by the same function as inference crops (``smear.data.crops``), jittered.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from smear.configs.errors import SmearError
from smear.configs.loader import config_to_dict, dump_config
from smear.configs.paths import git_commit, machine_description, resolve_path
from smear.data.crops import CropRow, ImageCache, crop_cell, crop_square, read_manifest
from smear.data.taxonomy import CELL_CLASSES, MORPHOLOGY_CLASSES, SUBTYPES

from .config import ClassifierConfig, MorphologyConfig, task_of
from .evaluate import epoch_metrics, plot_history
from .model import CellClassifier, ClassifierModel, save_model_folder
from .predict import predict_crops, to_tensor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- augmentation

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


# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB), as in scikit-image's rgb2hed
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def hed_jitter(crop: np.ndarray, sigma: float, rng: random.Random) -> np.ndarray:
    """HED colour augmentation: the crop's optical density split into stain channels, each scaled by 1 + U(-sigma,
    sigma) and shifted by U(-sigma, sigma) / 2, then recombined (Tellez et al., IEEE TMI 2018/2019)."""
    od = -np.log(np.maximum(crop.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    alpha = np.array([1 + rng.uniform(-sigma, sigma) for _ in range(3)], np.float32)
    beta = np.array([rng.uniform(-sigma, sigma) / 2 for _ in range(3)], np.float32)
    od = np.maximum((hed * alpha + beta) @ _RGB_FROM_HED, 0.0)
    return np.clip(255.0 * np.exp(-od), 0, 255).reshape(crop.shape).astype(np.uint8)


def blur_and_jpeg(crop: np.ndarray, blur: float, jpeg: float, rng: random.Random) -> np.ndarray:
    """With probability ``blur`` a Gaussian blur (sigma 0.3-1.5 px), with probability ``jpeg`` a JPEG round trip at
    quality 30-90: the focus and compression of other labs' cameras."""
    import cv2

    if blur and rng.random() < blur:
        crop = cv2.GaussianBlur(crop, (0, 0), rng.uniform(0.3, 1.5))
    if jpeg and rng.random() < jpeg:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, rng.randint(30, 90)])
        if ok:
            crop = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return crop


def _flip_and_stain(crop: np.ndarray, cfg: ClassifierConfig | MorphologyConfig, rng: random.Random) -> np.ndarray:
    if cfg.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if getattr(cfg, "stain_hed", 0.0):
        crop = hed_jitter(crop, cfg.stain_hed, rng)
    crop = stain_jitter(crop, cfg.hue_jitter, cfg.saturation_jitter, cfg.brightness_jitter, rng)
    return blur_and_jpeg(crop, getattr(cfg, "blur", 0.0), getattr(cfg, "jpeg", 0.0), rng)


def augmented_crop(image: np.ndarray, box: tuple[float, float, float, float], cfg: ClassifierConfig,
                   rng: random.Random) -> np.ndarray:
    """A training crop of a box: jittered centre, margin and zoom, any-angle rotation, flips, stain jitter."""
    shift = (rng.uniform(-1, 1) * cfg.center_jitter, rng.uniform(-1, 1) * cfg.center_jitter)
    margin = max(0.0, cfg.crop_margin + rng.uniform(-1, 1) * cfg.margin_jitter)
    zoom = 1 + rng.uniform(-1, 1) * cfg.zoom
    angle = rng.uniform(0, 360) if cfg.rotate else 0.0
    crop = crop_cell(image, box, margin, cfg.crop_size_px, angle_deg=angle, zoom=zoom, shift=shift)
    return _flip_and_stain(crop, cfg, rng)


def augmented_point_crop(image: np.ndarray, x: float, y: float, cfg: MorphologyConfig,
                         rng: random.Random) -> np.ndarray:
    """A training crop of a labelled point: shifted point, small zoom, any-angle rotation, flips, stain jitter."""
    x += rng.uniform(-1, 1) * cfg.center_jitter_px
    y += rng.uniform(-1, 1) * cfg.center_jitter_px
    side = cfg.cut_side_px * (1 + rng.uniform(-1, 1) * cfg.zoom)
    angle = rng.uniform(0, 360) if cfg.rotate else 0.0
    return _flip_and_stain(crop_square(image, x, y, side, cfg.crop_size_px, angle), cfg, rng)


def eval_crops(rows: list[CropRow], cache: ImageCache, size: int, margin: float) -> list[np.ndarray]:
    """Plain (inference) crops of manifest rows."""
    return [crop_cell(cache.get(r.image), r.box, margin, size) for r in rows]


# ---------------------------------------------------------------- the one training loop

@dataclass(frozen=True)
class Loop:
    """Settings of the training loop, filled by each task from its config."""

    epochs: int  # final phase: the deeper ``unfreeze_fraction`` of the backbone and the head
    lr: float
    weight_decay: float
    batch: int
    samples_per_epoch: int  # drawn with replacement, class-weighted
    balance_power: float  # class weight count^-power: 0 natural frequencies, 1 fully balanced
    label_smoothing: float
    seed: int
    device: str
    frozen_epochs: int = 0  # first phase: head only, at lr_head
    lr_head: float = 1e-3
    unfreeze_fraction: float = 1.0
    patience: int = 0  # final-phase epochs without improvement before stopping; 0: no early stop
    cosine: bool = False  # per step: warm-up over a quarter epoch, then cosine decay
    max_minutes: float = 0.0  # time budget: the cosine runs by time or steps, whichever is further along,
    #                           and training stops after the epoch that passes it (0: none)
    choose_on: str = "val_loss"  # the final-phase epoch kept: lowest val_loss, or highest val_macro_f1


def class_weights(labels: list[str], classes: Sequence[str], power: float) -> dict[str, float]:
    """Per-class sampling weight proportional to count^-power (0 natural, 1 balanced)."""
    counts = {c: max(1, sum(1 for lab in labels if lab == c)) for c in classes}
    return {c: counts[c] ** -power for c in classes}


def set_valued_loss(logits: torch.Tensor, allowed: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against a set of allowed classes per sample: ``-log sum_{c allowed} p_c``.

    One allowed class is plain cross-entropy (with PyTorch's label smoothing, same value); a group-only label such
    as ``WBC`` (Raabin's WBCs carry no subtype) allows every subtype, so it teaches the group and leaves the share
    among subtypes to the labelled cells."""
    logp = torch.log_softmax(logits, dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    return nll.mean()


def allowed_classes(label: str, classes: Sequence[str]) -> list[bool]:
    """The classes a training label allows: itself, or for the group label ``WBC`` every WBC subtype."""
    if label in classes:
        return [c == label for c in classes]
    if label == "WBC":
        return [c in SUBTYPES for c in classes]
    raise SmearError(f"training label {label!r} is neither a class of the model ({', '.join(classes)}) nor 'WBC'")


def optimise_epoch(net: nn.Module, opt: torch.optim.Optimizer, label_smoothing: float, batches, device: str,
                   sched=None) -> tuple[float, float]:
    """One epoch of optimisation steps over ``(inputs, allowed-class masks)`` batches; returns (mean loss, accuracy:
    the share whose top class is allowed)."""
    run_loss, run_correct, seen = 0.0, 0, 0
    for x, allowed in batches:
        x = x.to(device)
        allowed = torch.as_tensor(np.asarray(allowed), device=device)
        logits = net(x)
        loss = set_valued_loss(logits, allowed, label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        run_loss += loss.item() * len(x)
        run_correct += int(allowed.gather(1, logits.argmax(1, keepdim=True)).sum())
        seen += len(x)
    return run_loss / max(seen, 1), run_correct / max(seen, 1)


def _better(score: float | None, best: float | None, choose_on: str) -> bool:
    if score is None:
        return False
    if best is None:
        return True
    return score < best - 1e-4 if choose_on == "val_loss" else score > best


def fit(net: CellClassifier, classes: Sequence[str], items: Sequence[Any], labels: list[str],
        make_crop: Callable[[Any, random.Random], np.ndarray], val_crops: list[np.ndarray], val_labels: list[str],
        loop: Loop, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``net`` on augmented crops of ``items`` and leave the chosen epoch's weights in it.

    ``make_crop(item, rng)`` cuts one training crop. ``run_dir/last.pt`` (model, optimiser,
    schedule, history, best epoch) is written every epoch; ``resume=True`` continues it. Returns
    ``{"history", "best_epoch", "val_metrics" (the report of the chosen epoch), "minutes"}``.
    """
    classes = list(classes)
    ckpt = run_dir / "last.pt"
    rng = random.Random(loop.seed)
    torch.manual_seed(loop.seed)
    weights = class_weights(labels, sorted(set(labels), key=lambda c: (c not in classes, c)), loop.balance_power)
    sample_p = np.array([weights[lab] for lab in labels])
    sample_p /= sample_p.sum()
    masks = {lab: allowed_classes(lab, classes) for lab in set(labels)}
    targets = [masks[lab] for lab in labels]
    steps = max(1, loop.samples_per_epoch // loop.batch)
    total_epochs = loop.frozen_epochs + loop.epochs
    clock = {"start": time.time(), "before": 0.0}

    def minutes() -> float:
        return (clock["before"] + time.time() - clock["start"]) / 60

    def start_phase(phase: int):
        if phase == 1:
            net.freeze_backbone(0.0)
            opt = torch.optim.AdamW(net.head.parameters(), lr=loop.lr_head, weight_decay=loop.weight_decay)
        else:
            net.freeze_backbone(loop.unfreeze_fraction)
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=loop.lr,
                                    weight_decay=loop.weight_decay)
        if not loop.cosine:
            return opt, None
        total = steps * max(1, loop.frozen_epochs if phase == 1 else loop.epochs)

        def factor(step: int) -> float:
            done = step / total
            if loop.max_minutes:
                done = max(done, minutes() / loop.max_minutes)
            return min(1.0, (step + 1) / max(1, steps // 4)) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    history: list[dict] = []
    best: dict[str, Any] = {"score": None, "epoch": -1, "state": None, "metrics": None}
    start = 0
    phase = 1 if loop.frozen_epochs > 0 else 2
    opt, sched = start_phase(phase)
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint, written below
        net.load_state_dict(state["model"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        best.setdefault("score", best.get("val_loss", best.get("val_macro_f1")))  # a checkpoint of the two old loops
        phase = 1 if start < loop.frozen_epochs else 2
        opt, sched = start_phase(phase)
        if state.get("phase", 2) == phase:
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler"):
                sched.load_state_dict(state["scheduler"])
        rng.setstate(state["rng"])
        log.info("resumed %s at epoch %d", ckpt, start + 1)
    clock.update(start=time.time(), before=sum(h.get("seconds", 0) for h in history))
    scorer = ClassifierModel(net, classes, 0, 0.0)
    bar = _progress_bar(total_epochs, start, run_dir.name) if progress else None
    for epoch in range(start, total_epochs):
        if phase == 1 and epoch >= loop.frozen_epochs:
            phase = 2
            opt, sched = start_phase(2)
        t0 = time.time()
        net.train()
        net.set_frozen_bn_eval()
        idx = np.random.default_rng([loop.seed, epoch]).choice(len(items), size=steps * loop.batch, p=sample_p)
        batches = (idx[s * loop.batch:(s + 1) * loop.batch] for s in range(steps))
        train_loss, train_acc = optimise_epoch(
            net, opt, loop.label_smoothing, ((to_tensor([make_crop(items[i], rng) for i in b]), [targets[i] for i in b])
                                for b in batches), loop.device, sched)
        net.eval()
        entry: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "lr": opt.param_groups[0]["lr"],
                                 "train_loss": train_loss, "train_accuracy": train_acc}
        report = None
        if val_crops:
            head, report = epoch_metrics(predict_crops(scorer, val_crops), val_labels, classes)
            entry.update({f"val_{k}": v for k, v in head.items()})
        entry["seconds"] = round(time.time() - t0, 1)
        history.append(entry)
        log.info("epoch %d/%d %s", epoch + 1, total_epochs,
                 " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        if phase == 2 and (not val_crops or _better(entry.get(loop.choose_on), best["score"], loop.choose_on)):
            best = {"score": entry.get(loop.choose_on), "epoch": epoch + 1, "state": copy.deepcopy(net.state_dict()),
                    "metrics": report}
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "phase": phase,
                    "scheduler": sched.state_dict() if sched is not None else None, "history": history,
                    "best": best, "rng": rng.getstate()}, ckpt)
        if bar:
            bar.update(1)
        stalled = epoch + 1 - best["epoch"] >= loop.patience
        if phase == 2 and loop.patience and val_crops and best["epoch"] > 0 and stalled:
            log.info("early stop: %s has not improved for %d epochs (best epoch %d)", loop.choose_on,
                     loop.patience, best["epoch"])
            break
        if loop.max_minutes and minutes() >= loop.max_minutes and epoch + 1 < total_epochs:
            log.info("time limit: %.1f min reached after epoch %d; keeping best epoch %d", loop.max_minutes,
                     epoch + 1, best["epoch"])
            break
    if bar:
        bar.close()
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    return {"history": history, "best_epoch": best["epoch"], "val_metrics": best["metrics"],
            "minutes": round(minutes(), 2)}


def _progress_bar(total: int, initial: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="epoch", desc=name, leave=False)


def start_run(cfg: ClassifierConfig | MorphologyConfig, resume: bool) -> Path:
    """``project/name``, with the resolved config written to it; refuses to overwrite a run unless resuming."""
    run_dir = resolve_path(cfg.project) / cfg.name
    if (run_dir / "last.pt").exists() and not resume:
        raise SmearError(f"{run_dir}: run folder exists; pass --resume, or another name=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def save_run(run_dir: Path, net: CellClassifier, card: dict, result: dict) -> Path:
    """Write the model folder ``run_dir/model``: weights, card (json + md), history and training curves."""
    folder = run_dir / "model"
    card = {**card, "best_epoch": result["best_epoch"], "val_metrics": result["val_metrics"],
            "train_minutes": result["minutes"], "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "machine": machine_description(str(card.get("config", {}).get("device", "cpu")))}
    save_model_folder(folder, net, card)
    for target in (run_dir, folder):
        (target / "history.json").write_text(json.dumps(result["history"], indent=2))
    try:
        plot_history(result["history"], folder / "curves.png")
    except Exception as e:  # noqa: BLE001  a plot failure must not lose a trained model
        log.warning("training curves not plotted: %s", e)
    return folder


#: The data sets a classifier trained on, as its card names and cites them
DATA_SOURCES = {
    "bccd": "BCCD (MIT): 364 fields of one lab, official train/val/test split; WBC subtypes from its labels.csv",
    "pbc": "PBC: Acevedo A, Merino A, Alferez S, Molina A, Boldu L, Rodellar J. A dataset of microscopic peripheral "
           "blood cell images for development of automatic recognition systems. Data in Brief 30 (2020) 105474, "
           "doi:10.1016/j.dib.2020.105474. CC BY 4.0. CellaVision DM96, Hospital Clinic of Barcelona; used: 5,600 "
           "cells (700 per class), plus the RBCs and platelets around them in txl-external's PBC fields",
    "raabin": "Raabin-WBC fields of txl-external (MIT): RBC and platelet boxes, and WBC boxes without a subtype "
              "(group-only labels)",
}


def package_classifier(src: Path, dest: Path, extra: dict | None = None) -> Path:
    """Copy a trained model folder (``run/model``) to ``dest`` and complete its card: the machine, the data sources
    it trained on (cited) and ``extra`` (e.g. a summary). Refuses to overwrite a folder."""
    import shutil

    from smear.configs.modelcard import ModelCard

    src, dest = Path(src), Path(dest)
    if not (src / "weights.pt").is_file():
        raise SmearError(f"{src}: no weights.pt; give a trained model folder (runs/classifier/NAME/model)")
    if dest.exists():
        raise SmearError(f"{dest}: exists; choose another --out or remove it first")
    shutil.copytree(src, dest)
    card = ModelCard.read(dest)
    sources = (card.get("data") or {}).get("sources") or []
    card.set("data_sources", {s: DATA_SOURCES.get(s, s) for s in sources})
    if not card.get("machine"):
        card.set("machine", machine_description(str((card.get("config") or {}).get("device", "cpu"))))
    for k, v in (extra or {}).items():
        card.set(k, v)
    card.write(dest)
    return dest


# ---------------------------------------------------------------- tasks

def model_classes(cfg: ClassifierConfig, rows: Sequence[CropRow] | None = None) -> tuple[str, ...]:
    """The classes a model trained with ``cfg`` names: those of its task that the training ``rows`` hold (a BCCD-only
    model names no immature granulocyte), in the taxonomy's order."""
    classes = SUBTYPES if cfg.classes == "subtypes" else CELL_CLASSES
    if rows is None:
        return classes
    present = {r.label for r in rows}
    return tuple(c for c in classes if c in present)


def read_training_rows(cfg: ClassifierConfig) -> list[CropRow]:
    """The rows of every manifest of ``cfg`` whose label is one of the task's classes (for ``cells``, group-only
    ``WBC`` rows too: they train the group through :func:`set_valued_loss`), less ``exclude_sources``."""
    classes = model_classes(cfg) + (() if cfg.classes == "subtypes" else ("WBC",))
    excluded = {s.strip().lower() for s in cfg.exclude_sources.split(",") if s.strip()}
    rows = [r for m in cfg.manifest.split(",") if m.strip() for r in read_manifest(resolve_path(m.strip()), classes)]
    return [r for r in rows if r.source not in excluded]


def train(cfg: ClassifierConfig | MorphologyConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train the task of ``cfg`` (see ``config.load_task_config``); returns the model folder."""
    if isinstance(cfg, MorphologyConfig):
        return train_morphology(cfg, resume, progress)
    return train_classifier(cfg, resume, progress=progress)


def train_classifier(cfg: ClassifierConfig, resume: bool = False, train_rows: list[CropRow] | None = None,
                     val_rows: list[CropRow] | None = None, progress: bool = True) -> Path:
    """Train a cells or wbc-subtypes model on the crop manifest; write ``project/name/model``.

    Phase 1 trains the head on a frozen backbone, phase 2 the deeper layers too; the phase-2
    epoch with the lowest val loss is kept. ``train_rows``/``val_rows`` override the manifest
    splits (cross-validation).
    """
    torch.set_num_threads(cfg.threads)
    if train_rows is None:
        rows = read_training_rows(cfg)
        want = ("train", "val") if cfg.train_split == "trainval" else ("train",)
        train_rows = [r for r in rows if r.split in want]
        val_rows = [r for r in rows if r.split == "val"] if cfg.val_split == "val" and cfg.train_split != "trainval" else []
    val_rows = val_rows or []
    if not train_rows:
        raise SmearError("no training crops: check the manifest's split and label columns")
    classes = model_classes(cfg, train_rows)
    val_rows = [r for r in val_rows if r.label in classes]
    overlap = {r.image_id for r in train_rows} & {r.image_id for r in val_rows}
    if overlap:
        raise SmearError(f"{len(overlap)} source images have crops in both train and val (e.g. {sorted(overlap)[0]}); "
                         f"split by image")
    run_dir = start_run(cfg, resume)
    torch.manual_seed(cfg.seed)
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, cfg.pretrained).to(cfg.device)
    cache = ImageCache()
    loop = Loop(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch=cfg.batch,
                samples_per_epoch=cfg.samples_per_epoch, balance_power=cfg.balance_power,
                label_smoothing=cfg.label_smoothing, seed=cfg.seed, device=cfg.device,
                frozen_epochs=cfg.frozen_epochs, lr_head=cfg.lr_head, unfreeze_fraction=cfg.unfreeze_fraction,
                patience=cfg.patience, max_minutes=cfg.max_minutes)
    result = fit(net, classes, train_rows, [r.label for r in train_rows],
                 lambda r, rng: augmented_crop(cache.get(r.image), r.box, cfg, rng),
                 eval_crops(val_rows, cache, cfg.crop_size_px, cfg.crop_margin), [r.label for r in val_rows],
                 loop, run_dir, resume, progress)
    card = {
        "kind": "classifier", "task": task_of(cfg), "classes": list(classes), "config": config_to_dict(cfg),
        "title": f"Classifier {cfg.name} ({task_of(cfg)})",
        "data": {"manifest": [str(resolve_path(m.strip())) for m in cfg.manifest.split(",") if m.strip()],
                 "sources": sorted({r.source for r in train_rows}), "excluded_sources": cfg.exclude_sources,
                 "train_crops": len(train_rows), "val_crops": len(val_rows),
                 "train_images": len({r.image_id for r in train_rows}), "val_images": len({r.image_id for r in val_rows}),
                 "train_counts": {c: sum(1 for r in train_rows if r.label == c) for c in classes},
                 "train_counts_by_source": {s: {c: sum(1 for r in train_rows if r.label == c and r.source == s)
                                                for c in classes} for s in sorted({r.source for r in train_rows})}},
        "split": f"train on '{cfg.train_split}', choose on '{cfg.val_split}' (by source image; test never used)",
    }
    return save_run(run_dir, net, card, result)


def train_morphology(cfg: MorphologyConfig | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train an rbc-morphology model on the train images of Chula RBC-12; write ``project/name/model``.

    Images are split by image id (``smear.data.chula.split_images``; the lists go to ``split.json``).
    All layers train under a cosine schedule within ``max_minutes``; the epoch with the best val
    macro-F1 is kept. Test images are never read here: see ``evaluate.evaluate_morphology``.
    """
    from smear.data.chula import read_chula, split_images

    cfg = cfg or MorphologyConfig()
    torch.set_num_threads(cfg.threads)
    root = resolve_path(cfg.data_root)
    data = read_chula(root)
    split = split_images(data, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    train_cells = [c for i in split["train"] for c in data[i]]
    val_cells = [c for i in split["val"] for c in data[i]]
    if not train_cells:
        raise SmearError(f"{root}: no training cells after the split; check val_fraction and test_fraction")
    run_dir = start_run(cfg, resume)
    log.info("Chula RBC-12: %d train cells (%d images), %d val cells (%d images), %d test images held out",
             len(train_cells), len(split["train"]), len(val_cells), len(split["val"]), len(split["test"]))
    torch.manual_seed(cfg.seed)
    classes = MORPHOLOGY_CLASSES
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, cfg.pretrained).to(cfg.device)
    cache = ImageCache()
    val_crops = [crop_square(cache.get(c.image), c.x, c.y, cfg.cut_side_px, cfg.crop_size_px) for c in val_cells]
    loop = Loop(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch=cfg.batch,
                samples_per_epoch=cfg.samples_per_epoch, balance_power=cfg.balance_power,
                label_smoothing=cfg.label_smoothing, seed=cfg.seed, device=cfg.device, cosine=True,
                max_minutes=cfg.max_minutes, choose_on="val_macro_f1")
    result = fit(net, classes, train_cells, [c.label for c in train_cells],
                 lambda c, rng: augmented_point_crop(cache.get(c.image), c.x, c.y, cfg, rng),
                 val_crops, [c.label for c in val_cells], loop, run_dir, resume, progress)

    def counts(cells) -> dict[str, int]:
        labels = [c.label for c in cells]
        return {k: labels.count(k) for k in classes}

    card = {
        "kind": "morphology", "task": "rbc-morphology", "classes": list(classes), "config": config_to_dict(cfg),
        "title": f"RBC morphology model {cfg.name} (Chula RBC-12, 13 classes)",
        "summary": MORPHOLOGY_SUMMARY,
        "data": {"root": str(root), "source": "Chula RBC-12 (MIT)", "images": {s: len(v) for s, v in split.items()},
                 "cells": {"train": len(train_cells), "val": len(val_cells),
                           "test": sum(len(data[i]) for i in split["test"])},
                 "train_counts": counts(train_cells), "val_counts": counts(val_cells)},
        "split": {"rule": f"by image id: sha256('chula:{cfg.split_seed}:<id>') -> test < {cfg.test_fraction}, "
                          f"val < {cfg.test_fraction + cfg.val_fraction}, else train",
                  "file": "split.json"},
        "crop": {"training_side_px": cfg.cut_side_px, "cell_diameter_px": cfg.cell_diameter_px, "border": "replicate",
                 "inference": "side = cut_side_px x median RBC box diameter of the field / cell_diameter_px"},
        "limitations": MORPHOLOGY_LIMITATIONS,
    }
    folder = save_run(run_dir, net, card, result)
    (folder / "split.json").write_text(json.dumps(split, indent=1))
    return folder


MORPHOLOGY_SUMMARY = (
    "RBC morphology stage: one of the 13 Chula RBC-12 classes for every detected red cell. Training crops are "
    "squares of cut_side_px training pixels around each labelled point, resized to crop_size_px; at inference the "
    "crop side is cut_side_px x the field's median RBC box diameter / cell_diameter_px, so relative cell size "
    "survives. Test images (split.json) are used only by 'smear classifier evaluate'. Files: weights.pt (fp16 "
    "state dict), card.json, split.json, history.json; a confusion matrix PNG when evaluated.")
MORPHOLOGY_LIMITATIONS = [
    "Trained on one laboratory's stain and microscope (Chula, 1000x); other sources shift colour and scale, so "
    "treat calls as hints.",
    "Images are split by image, not by patient (the data names no patient), so cells of one smear can sit on "
    "both sides; elliptocytes come from a separate batch of 32 images, which likely makes them easy to tell apart.",
    "Morphology hints are not anemia, which is defined by haemoglobin.",
]
