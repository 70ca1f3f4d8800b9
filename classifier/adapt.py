"""``smear classifier adapt``: fine-tune a classifier on a lab's own labelled cells, in minutes on a CPU.

Input: ``CELLS_DIR/<class>/*`` cell images (crops, as ``smear classify`` takes them; folder names in any case, as
smear names the classes or their usual short forms: neutrophil, lymphocyte, ig, nrbc, platelet, ...). Classes without
a folder keep the base model's knowledge: the head and the deepest backbone stages train for a fixed number of
steps, pulled back towards the base weights (L2-SP, Li et al. 2018), with the base model's own predictions on the
lab's cells as a second target for the classes the lab did not label (distillation, as in Learning without
Forgetting). The result is an ordinary model folder whose card names the base model and the cells used per class.
When the lab labelled WBCs only, the folder is a two-stage cascade: the base network keeps deciding RBC / WBC /
platelet and the adapted one (``subtypes/``) names the subtype of likely WBCs, as the shipped BCCD cascade does.

Without labels: :func:`recalibrate_batchnorm` (``adapt --fields``), and :func:`self_train`, measured by
``benchmarks/classifier_labs.py --self-train`` and not offered by the command (its rule failed: docs/models.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smear.configs.errors import SmearError
from smear.configs.paths import git_commit, machine_description
from smear.data.images import IMAGE_SUFFIXES, read_image
from smear.data.taxonomy import _canonical_label

from .model import ClassifierModel, load_classifier, save_model_folder
from .predict import crop_from_cell_image, crops_from_boxes, predict_crops, to_tensor
from .train import augmented_crop, set_valued_loss

log = logging.getLogger(__name__)

#: The shipped single-stage classifier adapt starts from when no --base is given (the BCCD cascade cannot be adapted)
ADAPT_BASE = "multilab-mnv2-128"
#: Sub-folder of an adapted model that holds the adapted network when the lab gave WBC folders only
SUBTYPE_STAGE = "subtypes"
#: What an adapted model's card keeps of its base's: what loading and using the network needs (an ensemble's
#: ``ensemble`` too: its weights hold every member)
CARD_KEYS_KEPT = ("kind", "task", "classes", "config", "subtype_views", "ensemble")


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 150  # optimisation steps (batch ``batch``): ~1-2 min for a 128 px MobileNetV2 on 2 CPU cores
    batch: int = 32
    lr: float = 3e-4
    unfreeze_fraction: float = 0.3  # deepest backbone stages trained with the head
    l2sp: float = 0.01  # pull towards the base weights
    distill: float = 1.0  # weight of the base model's predictions for the classes without a folder
    label_smoothing: float = 0.05
    seed: int = 0
    threads: int = 2


def read_cells_dir(cells_dir: Path, classes: list[str]) -> dict[str, list[Path]]:
    """``{class: [image paths]}`` from ``cells_dir/<class>/``; a folder naming no class of the model is an error."""
    cells_dir = Path(cells_dir)
    if not cells_dir.is_dir():
        raise SmearError(f"{cells_dir}: not a folder; expected CELLS_DIR/<class>/<images>")
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in cells_dir.iterdir() if p.is_dir()):
        name = _canonical_label(sub.name.replace("-", "_"))
        name = next((c for c in classes if c.lower() == name.lower()), name)
        if name not in classes:
            raise SmearError(f"{sub}: folder names no class of the base model (classes: {', '.join(classes)})")
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out.setdefault(name, []).extend(files)
    if not out:
        raise SmearError(f"{cells_dir}: no cell images in class folders (e.g. {cells_dir}/lymphocyte/*.png)")
    return out


def adapt(cells_dir: Path, output: Path, base: str | Path | None = None, cfg: AdaptConfig | None = None) -> Path:
    """Fine-tune ``base`` (default: the shipped multi-lab classifier, ``ADAPT_BASE``) on ``cells_dir`` and write the
    model folder ``output``."""
    cfg = cfg or AdaptConfig()
    torch.set_num_threads(cfg.threads)
    model = load_classifier(base or ADAPT_BASE, with_refiner=False)
    if model.card.get("refiner"):
        raise SmearError(f"{model.folder}: the first stage of a cascade with a refiner; adapt a model that names "
                         "every class itself, such as the multi-lab classifier")
    # a base with a subtype stage: its own network is adapted, and the lab's cells replace that stage's call
    classes = list(model.classes)
    files = read_cells_dir(cells_dir, classes)
    images, labels, failed = [], [], []
    for c, paths in files.items():
        for p in paths:
            try:
                images.append(read_image(p))
                labels.append(c)
            except Exception as e:  # noqa: BLE001  one bad file never stops the batch
                failed.append(f"{p}: {e}")
    if not images:
        raise SmearError(f"{cells_dir}: no readable cell image ({len(failed)} failed)")
    t0 = time.time()
    model.net.eval()
    base_probs = predict_crops(model, [crop_from_cell_image(model, im) for im in images])  # runs in inference mode
    net = fine_tune(model.net, [(im, (0, 0, im.shape[1], im.shape[0])) for im in images], labels, classes,
                    base_probs, cfg, _crop_config(model))
    groups_labelled = bool({"RBC", "Platelets"} & set(files))
    card = {**{k: v for k, v in model.card.items() if k in CARD_KEYS_KEPT},
            "title": f"Classifier adapted from {model.folder.name}",
            "summary": (f"{model.folder.name} fine-tuned by 'smear classifier adapt' on {len(images)} cells of "
                        f"{len(files)} classes from {Path(cells_dir).resolve()}; classes without a folder keep the "
                        "base model's knowledge (distillation and L2-SP towards its weights)."),
            "base_model": {"folder": str(model.folder), "date": model.card.get("date"),
                           "commit": model.card.get("commit"),
                           **({"subtype_stage_replaced": model.card["subtyper"]["weights"]}
                              if model.card.get("subtyper") else {})},
            "adapt": {"cells_dir": str(Path(cells_dir).resolve()), "cells_per_class": {c: len(v) for c, v in
                                                                                    files.items()},
                      "unreadable": failed, "config": dataclasses.asdict(cfg),
                      "stages": ("one model: the lab labelled RBCs or platelets, so the adapted network makes every "
                                 "call" if groups_labelled else
                                 f"the base network decides RBC / WBC / platelet (as {model.folder.name} does); the "
                                 f"adapted network, in {SUBTYPE_STAGE}/, shares out the WBC probability among the "
                                 "subtypes (adapted on WBC folders alone, a whole model calls many RBCs and platelets "
                                 "WBCs: 3-group accuracy 0.95 -> 0.08-0.53, measured 2026-12-01)"),
                      "minutes": round((time.time() - t0) / 60, 2)},
            "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": machine_description("cpu")}
    output = Path(output)
    if groups_labelled:
        save_model_folder(output, net, card)
        return output
    # WBC folders only: the base keeps the group decision, the adapted network names the subtype
    save_model_folder(output / SUBTYPE_STAGE, net, {**card, "title": f"Subtype stage of {output.name}"})
    save_model_folder(output, model.net, {**card, "subtyper": {"weights": SUBTYPE_STAGE, "min_prob": 0.5}})
    return output


def fine_tune(net: torch.nn.Module, cells: Sequence[tuple[np.ndarray, tuple[float, float, float, float]]],
              labels: Sequence[str], classes: Sequence[str], base_probs: np.ndarray, cfg: AdaptConfig,
              crop_cfg) -> torch.nn.Module:
    """A copy of ``net`` fine-tuned on ``cells`` (``(image, box)`` pairs) labelled ``labels``: the head and the
    deepest ``cfg.unfreeze_fraction`` of the backbone, ``cfg.steps`` batches with the classes drawn evenly, crops
    through ``crop_cfg``'s training augmentation, pulled back towards ``net``'s weights (L2-SP), and ``base_probs``
    (``net``'s own predictions on the cells) distilled for the classes no cell is labelled with."""
    rng = random.Random(cfg.seed)
    net = copy.deepcopy(net)
    for p in net.parameters():  # a network handed over frozen (recalibrate_batchnorm's) trains as any other
        p.requires_grad = True
    net.freeze_backbone(cfg.unfreeze_fraction)
    net.train()
    net.set_frozen_bn_eval()
    anchors = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    labelled = torch.tensor([c in set(labels) for c in classes])
    allowed = torch.tensor([[c == lab for c in classes] for lab in labels])
    base_t = torch.from_numpy(np.asarray(base_probs, np.float32))
    per_class = {c: [i for i, lab in enumerate(labels) if lab == c] for c in dict.fromkeys(labels)}
    with torch.random.fork_rng():  # dropout drawn from the seed; the caller's generator is left as it was
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.steps):
            idx = [rng.choice(per_class[rng.choice(list(per_class))]) for _ in range(cfg.batch)]  # balanced classes
            logits = net(to_tensor([augmented_crop(*cells[i], crop_cfg, rng) for i in idx]))
            loss = set_valued_loss(logits, allowed[idx], cfg.label_smoothing)
            if cfg.distill and not bool(labelled.all()):
                # keep the base model's opinion among the classes no cell is labelled with
                logp = torch.log_softmax(logits[:, ~labelled], 1)
                target = base_t[idx][:, ~labelled]
                target = target / target.sum(1, keepdim=True).clamp_min(1e-8)
                loss = loss + cfg.distill * -(target * logp).sum(1).mean()
            if cfg.l2sp:
                loss = loss + cfg.l2sp * sum(((p - anchors[n]) ** 2).sum() for n, p in net.named_parameters()
                                             if p.requires_grad)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return net


def self_train(model: ClassifierModel, cells: Sequence[tuple[np.ndarray, tuple[float, float, float, float]]],
               cfg: AdaptConfig | None = None, keep: float = 0.5) -> tuple[torch.nn.Module, dict]:
    """``model``'s network moved towards a lab by its unlabelled ``cells`` (``(image, box)`` pairs): batch-norm
    statistics re-estimated (:func:`recalibrate_batchnorm`), then class-balanced self-training (Zou et al. 2018):
    each cell named once by the re-estimated network, the most confident ``keep`` share of each predicted class (at
    least one cell) taken as labels, and :func:`fine_tune` on them. Returns the network and what was used."""
    cfg = cfg or AdaptConfig()
    net = recalibrate_batchnorm(model, cells, seed=cfg.seed)
    recalibrated = dataclasses.replace(model, net=net)
    probs = predict_crops(recalibrated, [crops_from_boxes(model, image, [box])[0] for image, box in cells])
    called = probs.argmax(1)
    chosen: list[int] = []
    for k in np.unique(called):
        of = np.flatnonzero(called == k)
        chosen += of[np.argsort(-probs[of, k], kind="stable")][:max(1, round(keep * len(of)))].tolist()
    labels = [model.classes[called[i]] for i in chosen]
    tuned = fine_tune(net, [cells[i] for i in chosen], labels, list(model.classes), probs[chosen], cfg,
                      training_config(model))
    for p in tuned.parameters():
        p.requires_grad = False
    return tuned, {"cells": len(cells), "pseudo_labelled": dict(sorted(Counter(labels).items())), "keep": keep,
                   "config": dataclasses.asdict(cfg)}


def recalibrate_batchnorm(model: ClassifierModel, cells: Sequence[tuple[np.ndarray, tuple[float, float, float, float]]],
                          crop_cfg=None, min_inputs: int = 512, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model``'s network whose trained batch-norm layers have statistics re-estimated on ``cells``
    (``(image, box)`` pairs of a lab's cells; no labels), AdaBN (Li et al. 2016).

    Only the layers that trained with the network keep batch statistics of its training crops; the frozen stages
    kept ImageNet's statistics in training as in use, so they stay. The crops pass through the training augmentation
    of ``crop_cfg`` (default: the model's training config) in batches of its training size, each cell drawn in
    several random versions until ``min_inputs``, as the statistics were gathered in training.

    Raises:
        SmearError: when no cell is given, or the network runs under ONNX Runtime.
    """
    if not cells:
        raise SmearError("no cell to re-estimate the batch-norm statistics on")
    if not isinstance(model.net, torch.nn.Module):
        raise SmearError(f"{model.folder}: re-estimating statistics needs the torch network (weights.pt)")
    cfg = crop_cfg or training_config(model)
    net = copy.deepcopy(model.net)
    net.freeze_backbone(cfg.unfreeze_fraction)
    net.eval()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and any(p.requires_grad for p in m.parameters())]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < max(min_inputs, len(cells)):
        order += rng.sample(range(len(cells)), len(cells))
    with torch.no_grad():
        for k in range(0, len(order) - cfg.batch // 2, cfg.batch):  # batches at least half full weigh alike
            net(to_tensor([augmented_crop(*cells[i], cfg, rng) for i in order[k:k + cfg.batch]]))
    for m in norms:
        m.momentum = 0.1
    net.eval()
    for p in net.parameters():
        p.requires_grad = False
    return net


def require_subtype_stage(model: ClassifierModel) -> ClassifierModel:
    """``model``'s subtype stage; a cascade without one is an error that names the model that has one."""
    if model.subtyper is None:
        raise SmearError(f"{model.folder}: no subtype stage to adapt (the multi-lab classifier, {ADAPT_BASE}, has one)")
    return model.subtyper


def save_subtype_stage_adapted(model: ClassifierModel, net: torch.nn.Module, output: Path, summary: dict) -> Path:
    """Write cascade ``model`` as ``output`` with ``net`` (its subtype stage re-estimated by
    :func:`recalibrate_batchnorm`) as its subtype stage; ``summary`` (fields, WBCs, source) goes into both cards."""
    require_subtype_stage(model)
    stamp = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": machine_description("cpu")}
    base_ref = {"folder": str(model.folder), "date": model.card.get("date"), "commit": model.card.get("commit"),
                "subtype_stage_replaced": model.card["subtyper"]["weights"]}
    output = Path(output)
    save_model_folder(output / SUBTYPE_STAGE, net, {
        **{k: v for k, v in model.subtyper.card.items() if k in CARD_KEYS_KEPT},
        "title": f"Subtype stage of {output.name}", "base_model": {**base_ref, "folder": str(model.subtyper.folder)},
        "batchnorm_adaptation": summary, **stamp})
    save_model_folder(output, model.net, {
        **{k: v for k, v in model.card.items() if k in CARD_KEYS_KEPT},
        "title": f"Classifier adapted from {model.folder.name} (batch-norm statistics of its subtype stage)",
        "summary": (f"{model.folder.name} with its subtype stage's batch-norm statistics re-estimated on "
                    f"{summary.get('wbcs')} WBCs of {summary.get('fields')} unlabelled fields of the lab; the group "
                    "decision and every weight are the base model's."),
        "base_model": base_ref, "batchnorm_adaptation": summary,
        "subtyper": {"weights": SUBTYPE_STAGE, "min_prob": model.subtype_min_prob}, **stamp})
    return output


def training_config(model: ClassifierModel):
    """The settings ``model`` was trained with (its card's config): crop size, margin and augmentation."""
    from smear.configs.loader import build_known_config

    from .config import ClassifierConfig

    return build_known_config(ClassifierConfig, model.card.get("config") or {}, source=f"{model.folder}/card.json")


def _crop_config(model: ClassifierModel):
    """The augmentation settings of the base model's training, with no margin: a lab's cell images are already
    cropped around the cell, as ``smear classify`` reads them."""
    cfg = training_config(model)
    return dataclasses.replace(cfg, crop_margin=0.0, margin_jitter=min(cfg.margin_jitter, 0.05))
