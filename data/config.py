"""How 'smear data prepare' reads a source and writes the training sets."""

from __future__ import annotations

from dataclasses import dataclass

from smear.configs.loader import param


@dataclass(frozen=True)
class DataConfig:
    """How ``smear data prepare`` reads a source and writes the training sets."""

    source: str = param("../shared/data/bccd", "labelled source: VOC folder, YOLO data.yaml or COCO json")
    subtypes_csv: str = param("../shared/data/bccd/wbc_subtypes.csv", "WBC subtype label per image (BCCD); '' for none")
    crop_margin: float = param(0.15, "margin added around each box on every side, as a fraction of its size", range=(0.0, 1.0))
    crop_size_px: int = param(128, "side of the square crops written for the classifier", range=(16, 1024))
    duplicate_iou: float = param(0.85, "same-class boxes overlapping more than this are near-duplicates; one is kept", range=(0.3, 1.0))
    min_box_px: float = param(2.0, "boxes narrower or shorter than this after clipping are dropped", range=(0.0, 100.0))
    split_seed: int = param(0, "seed of the image-level split for sources without ImageSets", range=(0, None))
    val_fraction: float = param(0.2, "image fraction for val when the source has no split", range=(0.0, 0.5))
    test_fraction: float = param(0.2, "image fraction for test when the source has no split", range=(0.0, 0.5))
    relabel_train_wbc: bool = param(True, "training split only: a Platelets box the audit finds to be an unboxed WBC "
                                          "(larger than the median RBC, where the subtype table names a WBC and no WBC "
                                          "box exists) becomes that WBC; val and test keep their labels")
