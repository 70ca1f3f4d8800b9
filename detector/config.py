"""Detector configuration (mirrored in configs/detector.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from smear.configs.loader import param

# The detector score the pipeline keeps, chosen on val (PipelineConfig.conf shares it).
OPERATING_CONF = 0.4


@dataclass(frozen=True)
class DetectorConfig:
    """Training and inference settings of the YOLO detector."""

    data: str = param("runs/prepared/bccd/yolo/data.yaml", "YOLO data.yaml written by 'smear data prepare'")
    model: str = param("yolov8n.yaml", "architecture yaml (from scratch) or a local .pt to start from (e.g. COCO weights)")
    imgsz: int = param(640, "training / inference image size in pixels (long side)", range=(64, 4096))
    epochs: int = param(40, "training epochs", range=(1, 1000))
    time: float = param(0.0, "wall-clock training budget in hours; > 0 overrides epochs (ultralytics re-fits the "
                             "epoch count and schedule to the budget after each epoch)", range=(0.0, 1000.0))
    batch: int = param(16, "images per batch", range=(1, 512))
    nbs: int = param(16, "nominal batch: gradients add up over round(nbs / batch) batches per optimiser step; 16 "
                         "(every batch a step) reached val mAP50 0.914 in a 90-minute CPU run where ultralytics' "
                         "default 64 reached 0.889", range=(1, 1024))
    cache: bool = param(False, "keep decoded training images in RAM (saves JPEG decoding each epoch)")
    workers: int = param(2, "data loader workers (ultralytics loads in the main process on a CPU device)",
                         range=(0, 64))
    threads: int = param(0, "torch CPU threads for training and inference; 0: one per core (ultralytics alone "
                            "would use cores - 1, one thread on a 2-core machine)", range=(0, 256))
    device: str = param("cpu", "torch device: cpu, 0, cuda:0, mps")
    optimizer: str = param("auto", "optimizer", choices=("auto", "SGD", "Adam", "AdamW", "MuSGD"))
    lr0: float = param(0.01, "initial learning rate", range=(1e-6, 1.0))
    cos_lr: bool = param(False, "cosine learning-rate schedule")
    warmup_epochs: float = param(3.0, "epochs of learning-rate warm-up (short fine-tunes want less)", range=(0.0, 100.0))
    patience: int = param(100, "epochs without val improvement before stopping", range=(0, 1000))
    seed: int = param(0, "random seed", range=(0, None))
    fliplr: float = param(0.5, "probability of a horizontal flip", range=(0.0, 1.0))
    flipud: float = param(0.5, "probability of a vertical flip (smears have no up)", range=(0.0, 1.0))
    degrees: float = param(0.0, "random rotation range in degrees", range=(0.0, 180.0))
    scale: float = param(0.5, "random scale jitter (+/- fraction)", range=(0.0, 0.95))
    translate: float = param(0.1, "random translation (fraction of image)", range=(0.0, 0.9))
    hsv_h: float = param(0.015, "stain hue jitter (fraction)", range=(0.0, 1.0))
    hsv_s: float = param(0.5, "stain saturation jitter (fraction)", range=(0.0, 1.0))
    hsv_v: float = param(0.3, "brightness jitter (fraction)", range=(0.0, 1.0))
    stain_jitter: float = param(0.0, "HED stain jitter in training: each stain's density scaled by 1 +/- and shifted "
                                     "by +/- this (Tellez et al. 2019: 0.05 light, 0.2 strong); 0 = off",
                                range=(0.0, 1.0))
    blur: float = param(0.0, "probability of a defocus blur in training (Gaussian, SD 0.5-2 px)", range=(0.0, 1.0))
    mosaic: float = param(1.0, "probability of mosaic augmentation", range=(0.0, 1.0))
    mixup: float = param(0.0, "probability of mixup augmentation", range=(0.0, 1.0))
    close_mosaic: int = param(5, "final epochs trained without mosaic", range=(0, 1000))
    rect: bool = param(False, "rectangular batches (native 4:3 fields, disables mosaic shuffling)")
    conf: float = param(OPERATING_CONF, "minimum detection score kept at inference (the pipeline's operating point)",
                        range=(0.0, 1.0))
    iou: float = param(0.5, "NMS IoU threshold at inference", range=(0.05, 1.0))
    max_det: int = param(1000, "maximum detections per image (or tile)", range=(1, 100000))
    tile_px: int = param(640, "tile side at inference; images with a side > 1.5 x this are tiled", range=(128, 100000))
    tile_overlap_px: int = param(256, "overlap between tiles; larger than the largest cell (WBCs reach ~250 px)",
                                 range=(0, 4096))
    project: str = param("runs/detector", "folder that receives training runs")
    name: str = param("train", "run name (a folder under project)")
