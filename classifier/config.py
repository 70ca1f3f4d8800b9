"""Classifier configuration (mirrored in configs/classifier.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from smear.configs.loader import param

BACKBONES = ("resnet50", "efficientnet_lite0", "mobilenet_v2")


@dataclass(frozen=True)
class ClassifierConfig:
    """Training settings of the crop classifier. The study's recipe is the default head and schedule."""

    manifest: str = param("runs/prepared/bccd/crops/manifest.csv", "crop manifest written by 'smear data prepare'")
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
    threads: int = param(2, "CPU threads for torch", range=(1, 256))
    device: str = param("cpu", "torch device: cpu, cuda, cuda:0, mps")
    seed: int = param(0, "random seed", range=(0, None))
    train_split: str = param("train", "manifest split used for training", choices=("train", "trainval"))
    val_split: str = param("val", "manifest split used for early stopping and model choice", choices=("val", "none"))
    project: str = param("runs/classifier", "folder that receives training runs")
    name: str = param("train", "run name (a folder under project)")
