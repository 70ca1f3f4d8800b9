"""Classifier configurations, one per task (mirrored in configs/classifier.yaml and configs/morphology.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from smear.configs.errors import ConfigError
from smear.configs.loader import load_config, param

# How many rotations and reflections of a likely WBC's crop its subtype call may average over (test-time
# augmentation, ``subtype_views``); here, not beside the networks, so that configs and scripts read it without torch.
SUBTYPE_VIEWS = (1, 2, 4, 8)

BACKBONES = ("resnet50", "efficientnet_lite0", "mobilenet_v2")


@dataclass(frozen=True)
class ClassifierConfig:
    """Training settings of the crop classifier. The study's recipe is the default head and schedule."""

    manifest: str = param("runs/prepared/bccd/crops/manifest.csv", "crop manifest(s) from 'smear data prepare' or "
                          "'smear data pbc', comma-separated to train across labs")
    exclude_sources: str = param("", "leave out the rows of these sources (comma-separated, e.g. 'pbc'): "
                                 "leave-one-lab-out training")
    classes: str = param("cells", "what the model names: 'cells' (RBC, Platelets and the 5 WBC subtypes) or "
                         "'subtypes' (the 5 WBC subtypes of a cell known to be a WBC)", choices=("cells", "subtypes"))
    backbone: str = param("efficientnet_lite0", "feature extractor", choices=BACKBONES)
    pretrained: str = param("imagenet", "'imagenet' (local weights only, never downloaded), 'none', or a .pt/.pth file")
    crop_size_px: int = param(96, "side of the square network input", range=(32, 512))
    crop_margin: float = param(0.15, "margin around a box at inference, fraction of its size per side", range=(0.0, 1.0))
    margin_jitter: float = param(0.15, "training margin drawn from crop_margin +/- this", range=(0.0, 1.0))
    center_jitter: float = param(0.08, "training box-centre shift, fraction of box size", range=(0.0, 0.5))
    zoom: float = param(0.15, "training zoom jitter (+/- fraction)", range=(0.0, 0.9))
    rotate: bool = param(True, "random rotation by any angle during training")
    flip: bool = param(True, "random flips during training")
    hue_jitter: float = param(0.02, "stain hue jitter (fraction of the hue circle)", range=(0.0, 0.5))
    saturation_jitter: float = param(0.2, "stain saturation jitter (+/- fraction)", range=(0.0, 1.0))
    brightness_jitter: float = param(0.2, "brightness / contrast jitter (+/- fraction)", range=(0.0, 1.0))
    stain_hed: float = param(0.0, "HED stain jitter: each haematoxylin / eosin / DAB channel scaled by 1 +/- this and "
                             "shifted by +/- this / 2 (Tellez et al. 2019); 0 off", range=(0.0, 1.0))
    blur: float = param(0.0, "probability of a Gaussian blur (sigma 0.3-1.5 crop px): focus differs between "
                        "microscopes", range=(0.0, 1.0))
    jpeg: float = param(0.0, "probability of JPEG re-compression at quality 30-90", range=(0.0, 1.0))
    head_hidden: int = param(128, "units of the dense layer after global average pooling", range=(8, 4096))
    dropout: float = param(0.5, "dropout before the output layer", range=(0.0, 0.95))
    frozen_epochs: int = param(2, "phase 1: epochs with the backbone frozen", range=(0, 1000))
    epochs: int = param(14, "phase 2: maximum epochs with the deeper layers unfrozen", range=(0, 1000))
    unfreeze_fraction: float = param(0.5, "phase 2: fraction of backbone stages (deepest first) trained", range=(0.0, 1.0))
    lr_head: float = param(1e-3, "phase 1 learning rate (head only)", range=(1e-7, 1.0))
    lr: float = param(1e-4, "phase 2 learning rate (Adam), as in the study", range=(1e-7, 1.0))
    weight_decay: float = param(1e-4, "AdamW weight decay", range=(0.0, 1.0))
    batch: int = param(32, "crops per batch", range=(1, 1024))
    samples_per_epoch: int = param(2400, "crops drawn per epoch (with replacement, class-weighted)", range=(32, 10**7))
    balance_power: float = param(0.5, "class weighting: 0 natural frequencies, 1 fully balanced", range=(0.0, 1.0))
    label_smoothing: float = param(0.05, "cross-entropy label smoothing", range=(0.0, 0.5))
    patience: int = param(5, "phase 2 epochs without val-loss improvement before stopping", range=(1, 1000))
    max_minutes: float = param(0.0, "time budget: training stops after the epoch that passes it and keeps the best "
                               "epoch so far (0: none)", range=(0.0, None))
    threads: int = param(2, "CPU threads for torch", range=(1, 256))
    device: str = param("cpu", "torch device: cpu, cuda, cuda:0, mps")
    seed: int = param(0, "random seed", range=(0, None))
    train_split: str = param("train", "manifest split used for training", choices=("train", "trainval"))
    val_split: str = param("val", "manifest split used for early stopping and model choice", choices=("val", "none"))
    project: str = param("runs/classifier", "folder that receives training runs")
    name: str = param("train", "run name (a folder under project)")


@dataclass(frozen=True)
class MorphologyConfig:
    """Training settings of the RBC morphology classifier (configs/morphology.yaml)."""

    data_root: str = param("../shared/data/chula-rbc-12", "Chula RBC-12 folder (Dataset/, Label/)")
    cell_diameter_px: float = param(39.0, "typical RBC box diameter in the training images, px; used at inference "
                                    "only (Chula: detector boxes median 39, Otsu masks 35)", range=(4.0, 1000.0))
    cut_side_px: int = param(56, "side of the square cut around each labelled point, training-image px", range=(8, 1024))
    crop_size_px: int = param(64, "side of the network input (the crop is resized to it)", range=(32, 512))
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


# What each task's model names; cells and wbc-subtypes learn from the BCCD crop manifest, rbc-morphology
# from Chula RBC-12 point labels. All three share one training loop (train.fit) and one report.
TASKS = {
    "cells": "RBC, platelets and the 5 WBC subtypes (BCCD crops; ClassifierConfig)",
    "wbc-subtypes": "the 5 WBC subtypes of a cell known to be a WBC (BCCD crops; ClassifierConfig classes=subtypes)",
    "rbc-morphology": "13 RBC shapes (Chula RBC-12 points; MorphologyConfig)",
}


def load_task_config(task: str | None, path: str | Path | None = None,
                     overrides: Mapping[str, Any] | None = None) -> ClassifierConfig | MorphologyConfig:
    """The training config of ``task``: defaults, then the YAML at ``path``, then ``overrides``.

    ``task=None`` reads a ClassifierConfig as given (``classes`` picks cells or subtypes).

    Example:
        >>> cfg = load_task_config("rbc-morphology", None, {"epochs": 3})
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task!r}: valid tasks are {', '.join(TASKS)}")
    if task == "rbc-morphology":
        return load_config(MorphologyConfig, path, overrides)
    values = dict(overrides or {})
    if task is not None:
        want = "subtypes" if task == "wbc-subtypes" else "cells"
        if values.setdefault("classes", want) != want:
            raise ConfigError(f"task={task} trains classes={want}, got classes={values['classes']}; drop one of them")
    return load_config(ClassifierConfig, path, values)


def task_of(cfg: ClassifierConfig | MorphologyConfig) -> str:
    """The task a config trains."""
    if isinstance(cfg, MorphologyConfig):
        return "rbc-morphology"
    return "wbc-subtypes" if cfg.classes == "subtypes" else "cells"
