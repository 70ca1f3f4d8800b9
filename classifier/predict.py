"""Classify cell crops: from boxes on a field, or from pre-cropped cell images; name the morphology of RBCs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from smear.data.crops import crop_cell, crop_square, mirrored_point_crop

from .model import IMAGENET_MEAN, IMAGENET_STD, ClassifierModel

log = logging.getLogger(__name__)

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255


def to_array(crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """RGB uint8 crops (N, H, W, 3) -> normalised float32 array (N, 3, H, W), C-contiguous."""
    arr = np.asarray(crops, dtype=np.float32)
    arr = (arr - _MEAN) / _STD
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def to_tensor(crops: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB uint8 crops (N, H, W, 3) -> normalised float tensor (N, 3, H, W)."""
    return torch.from_numpy(to_array(crops))


@torch.inference_mode()
def predict_crops(model: ClassifierModel, crops: Sequence[np.ndarray], batch: int = 256,
                  pad: bool | None = None) -> np.ndarray:
    """Class probabilities (N, n_classes) for RGB crops already at ``model.crop_size_px``.

    ``pad`` (default: on any device but the CPU) pads each batch with blank crops to
    :func:`padded_size`; the probabilities are the same either way. A model on the onnx runtime
    runs each batch as it is (ONNX Runtime on the CPU)."""
    if len(crops) == 0:
        return np.zeros((0, len(model.classes)), dtype=np.float32)
    if model.runtime == "onnx":
        logits = [torch.from_numpy(model.net(to_array(crops[i: i + batch]))) for i in range(0, len(crops), batch)]
        return torch.softmax(torch.cat(logits).float(), dim=1).numpy()
    device = next(model.net.parameters()).device
    out = []
    for i in range(0, len(crops), batch):
        x = to_tensor(crops[i: i + batch])
        n = len(x)
        if device.type != "cpu" if pad is None else pad:  # a few batch shapes, not one per crop count
            x = torch.cat([x, x.new_zeros((padded_size(n, batch) - n, *x.shape[1:]))])
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        logits = model.net(x)[:n]
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def padded_size(n: int, batch: int) -> int:
    """``n`` rounded up to a power of two (at least 8, at most ``batch``).

    On a GPU every new input shape costs a one-time kernel choice (measured on an H200: the first
    pass over 72 fields took 31-36 s, the same fields again 0.7 s, because each field's crop count was
    a new batch shape). Padding to a power of two leaves at most six shapes per model at batch 256.

    Example:
        >>> [padded_size(n, 256) for n in (1, 8, 9, 100, 256)]
        [8, 8, 16, 128, 256]
    """
    return min(max(8, 1 << (n - 1).bit_length()), max(batch, n))


# the 8 rotations and reflections of a square crop: itself, the two flips, the half turn, then the quarter turns
# and their mirror images (the first 2 or 4 are the cheaper subsets)
_DIHEDRAL = (lambda c: c, lambda c: c[:, ::-1], lambda c: c[::-1], lambda c: c[::-1, ::-1],
             lambda c: np.rot90(c), lambda c: np.rot90(c)[:, ::-1], lambda c: np.rot90(c, 3),
             lambda c: np.rot90(c, 3)[:, ::-1])


def dihedral_view(crop: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (0-7) of a square crop among its rotations and reflections; 0 is the crop itself.

    Example:
        >>> c = np.arange(4).reshape(2, 2)
        >>> [dihedral_view(c, k).tolist() for k in (0, 1, 3)]
        [[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[3, 2], [1, 0]]]
    """
    return np.ascontiguousarray(_DIHEDRAL[k](crop))


def predict_views(model: ClassifierModel, crops: Sequence[np.ndarray], views: int = 1, batch: int = 256) -> np.ndarray:
    """Class probabilities averaged over the first ``views`` dihedral views of each crop (test-time
    augmentation; 1: :func:`predict_crops` itself). Cells have no up or left, so each view is as valid as the crop."""
    if views <= 1 or len(crops) == 0:
        return predict_crops(model, crops, batch)
    step = max(1, batch // views)  # a batch's worth of views at a time: memory stays that of one batch
    out = []
    for i in range(0, len(crops), step):
        chunk = crops[i:i + step]
        probs = predict_crops(model, [dihedral_view(c, v) for v in range(views) for c in chunk], batch)
        out.append(probs.reshape(views, len(chunk), -1).mean(0))
    return np.concatenate(out)


def crops_from_boxes(model: ClassifierModel, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Crops of ``boxes`` (xyxy, original pixels) cut the way the model was trained."""
    return [crop_cell(image_rgb, b, model.crop_margin, model.crop_size_px) for b in boxes]


def _refine_mask(model: ClassifierModel, probs: np.ndarray) -> np.ndarray:
    """Crops whose probability for a refined group reaches ``refine_min_prob``."""
    from smear.data.taxonomy import group_of

    cols = [k for k, c in enumerate(model.classes) if group_of(c) in model.refine_groups]
    if model.refiner is None or not cols or not len(probs):
        return np.zeros(len(probs), bool)
    return probs[:, cols].sum(1) >= model.refine_min_prob


def rescore_cascade(model: ClassifierModel, probs: np.ndarray, crop_of, batch: int = 256) -> np.ndarray:
    """The cascade's later stages on the fast model's ``probs``, in place.

    The refiner re-scores, at its own crop size, the crops that may belong to a refined group
    (e.g. every possible WBC). Then, for crops whose WBC probability (subtypes summed) reaches
    ``subtype_min_prob``, the WBC mass stays what the cell classifier gave and the subtype stage
    shares it out: ``p(subtype) = p(WBC) x p_subtyper(subtype | WBC)``, so group decisions are
    unchanged. With ``model.subtype_views`` > 1, ``p_subtyper`` is the mean over that many rotations and
    reflections of the crop (a model without a subtype stage shares out its own WBC mass that way).
    ``crop_of(k, stage_model)`` returns crop ``k`` cut the way ``stage_model`` wants it.
    """
    from smear.data.taxonomy import SUBTYPES

    mask = _refine_mask(model, probs)
    if mask.any():
        idx = np.flatnonzero(mask)
        probs[idx] = predict_crops(model.refiner, [crop_of(k, model.refiner) for k in idx], batch)
    # with test-time augmentation and no subtype stage, the sharpest model of the cascade names the subtypes
    sub = model.subtyper or ((model.refiner or model) if model.subtype_views > 1 else None)
    if sub is None or not len(probs):
        return probs
    # a subtype stage may also know other classes (an adapted whole-cell model): only its shares among the subtypes
    own = [j for j, c in enumerate(sub.classes) if c in SUBTYPES]
    cols = [model.classes.index(sub.classes[j]) for j in own]
    wbc_cols = [k for k, c in enumerate(model.classes) if c in SUBTYPES]
    wbc = probs[:, wbc_cols].sum(1)
    idx = np.flatnonzero(wbc >= model.subtype_min_prob)
    if len(idx):
        p_sub = predict_views(sub, [crop_of(k, sub) for k in idx], model.subtype_views, batch)[:, own]
        p_sub = p_sub / np.clip(p_sub.sum(1, keepdims=True), 1e-12, None)
        probs[np.ix_(idx, wbc_cols)] = 0.0
        probs[np.ix_(idx, cols)] = wbc[idx, None] * p_sub
    return probs


def classify_fields(model: ClassifierModel, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]],
                    batch: int = 256) -> list[np.ndarray]:
    """Class probabilities for the boxes of several fields (one array per field), in one pass per model.

    With a cascade, the fast model scores every crop and the later stages (``rescore_cascade``)
    re-score, at their own crop sizes, only the crops that may be WBCs: the rare cells that need
    detail get it without paying for it on every RBC.
    """
    owners = [(i, b) for i, bs in enumerate(boxes) for b in bs]
    crops = [c for img, bs in zip(images, boxes) for c in crops_from_boxes(model, img, bs)]
    probs = predict_crops(model, crops, batch)
    rescore_cascade(model, probs, lambda k, m: crop_cell(images[owners[k][0]], owners[k][1], m.crop_margin,
                                                         m.crop_size_px), batch)
    out, start = [], 0
    for bs in boxes:
        out.append(probs[start:start + len(bs)])
        start += len(bs)
    return out


def classify_boxes(model: ClassifierModel, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]],
                   batch: int = 256) -> np.ndarray:
    """Class probabilities for each box of one field."""
    return classify_fields(model, [image_rgb], [boxes], batch)[0]


def crop_from_cell_image(model: ClassifierModel, image_rgb: np.ndarray) -> np.ndarray:
    """A user's pre-cropped cell image (tight or with a margin) as a model input.

    The whole image is the cell's neighbourhood: squared around its centre (edges replicated)
    and resized, with no extra margin added.
    """
    h, w = image_rgb.shape[:2]
    return crop_cell(image_rgb, (0, 0, w, h), 0.0, model.crop_size_px)


def classify_files(model: ClassifierModel, paths: Sequence[Path], batch: int = 256) -> list[dict]:
    """``{"image", "label", "score", "probs"}`` per file, or ``{"image", "error"}``; the batch goes on."""
    from smear.data.images import read_image

    records: list[dict] = []
    pending: list[tuple[int, np.ndarray]] = []
    imgs: list[np.ndarray] = []
    for p in paths:
        try:
            img = read_image(p)
        except Exception as e:  # noqa: BLE001  one bad file never stops the batch
            records.append({"image": str(p), "error": str(e)})
            continue
        records.append({"image": str(p)})
        pending.append((len(records) - 1, crop_from_cell_image(model, img)))
        imgs.append(img)
    probs = predict_crops(model, [c for _, c in pending], batch)
    rescore_cascade(model, probs, lambda k, m: crop_from_cell_image(m, imgs[k]), batch)
    for (idx, _), pr in zip(pending, probs):
        k = int(pr.argmax())
        records[idx].update({"label": model.classes[k], "score": round(float(pr[k]), 4),
                             "probs": {c: round(float(v), 4) for c, v in zip(model.classes, pr)}})
    return records


# ---------------------------------------------------------------- RBC morphology (Chula RBC-12 model)

RBC_DIAMETER_UM = 7.5
MIN_RBC_FOR_FIELD_SCALE = 5


@dataclass
class MorphologyModel:
    """A loaded RBC morphology folder; ``annotate`` names the morphology of every RBC of a field.

    Crop scale. Training crops are squares of ``cut_side_px`` training pixels around each labelled point
    (Chula RBCs measure ~35 px; the BCCD detector's RBC boxes on Chula fields have a median diameter
    of 39 px, ``cell_diameter_px``). At inference the side is scaled so the field's *median* RBC box
    maps to ``cell_diameter_px``: ``side = cut_side_px x median_rbc_box_diameter / cell_diameter_px``. The
    scale comes from the field, not from each cell, so relative size survives (macrocytes and
    microcytes stay larger or smaller than their neighbours). A known pixel size (``pixel_size_um``)
    uses Chula's absolute scale instead (7.5 um normal RBC over ``cell_diameter_px``); fields with
    fewer than ``MIN_RBC_FOR_FIELD_SCALE`` RBCs fall back to each cell's own box.
    """

    model: ClassifierModel
    config: dict
    card: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def crop_sides(self, boxes: Sequence[Sequence[float]], all_rbc_boxes: Sequence[Sequence[float]] | None = None,
                   pixel_size_um: float | None = None) -> list[float]:
        """Crop side (field px) per box, matching the training scale (see the class docstring)."""
        cut_side_px, ref_px = float(self.config["cut_side_px"]), float(self.config["cell_diameter_px"])
        if pixel_size_um:
            training_um_per_px = RBC_DIAMETER_UM / ref_px
            return [cut_side_px * training_um_per_px / pixel_size_um] * len(boxes)
        diam = [((b[2] - b[0]) + (b[3] - b[1])) / 2 for b in (all_rbc_boxes if all_rbc_boxes is not None else boxes)]
        if len(diam) >= MIN_RBC_FOR_FIELD_SCALE:
            return [cut_side_px * float(np.median(diam)) / ref_px] * len(boxes)
        return [cut_side_px * max(((b[2] - b[0]) + (b[3] - b[1])) / 2, 1.0) / ref_px for b in boxes]

    def crop(self, image_rgb: np.ndarray, x: float, y: float, side_px: float) -> np.ndarray:
        """The model's input for a cell centred on (x, y), cut as in its training: the card's ``crop.border`` is
        ``replicate`` (the one crop function) for models trained since it, ``reflect_101`` for those before."""
        size = int(self.config["crop_size_px"])
        if (self.card.get("crop") or {}).get("border", "reflect_101") == "replicate":
            return crop_square(image_rgb, x, y, side_px, size)
        return mirrored_point_crop(image_rgb, x, y, side_px, size)

    def classify_boxes(self, image_rgb: np.ndarray, boxes: Sequence[Sequence[float]],
                       pixel_size_um: float | None = None) -> np.ndarray:
        """Class probabilities (N, 13) of RBC boxes (xyxy) of one field."""
        if len(boxes) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        crops = [self.crop(image_rgb, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, side)
                 for b, side in zip(boxes, self.crop_sides(boxes, None, pixel_size_um))]
        return predict_crops(self.model, crops)

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
        return {"weights": str(self.folder), "runtime": self.model.runtime, "classes": self.classes,
                "backbone": self.config.get("backbone"),
                "crop_size_px": self.config.get("crop_size_px"), "cut_side_px": self.config.get("cut_side_px"),
                "cell_diameter_px": self.config.get("cell_diameter_px"), "date": self.card.get("date"),
                "commit": self.card.get("commit"),
                "test_metrics": {k: test.get(k) for k in ("n", "accuracy", "macro_f1", "normal_vs_abnormal")}
                if test else None}


def load_morphology_model(weights: str | Path | None = None, device: str = "cpu", runtime: str = "torch",
                          threads: int = 0) -> MorphologyModel:
    """Load a morphology folder (``weights.pt`` + ``card.json``); ``None`` means the shipped one.
    ``runtime="onnx"``: its ``weights.onnx`` under ONNX Runtime when current (as :func:`load_classifier`).

    Raises:
        ModelNotFoundError: no folder there (the message says where it looked and how to make one).
        SmearError: the folder is not a morphology model.
    """
    from .model import load_runtime_network, read_card, resolve_morphology_folder

    folder = resolve_morphology_folder(weights)
    card = read_card(folder, "morphology")
    cfg = card["config"]
    net, fallback = load_runtime_network(folder, card, device, runtime, threads)
    model = ClassifierModel(net=net, classes=list(card["classes"]), crop_size_px=int(cfg["crop_size_px"]),
                            crop_margin=0.0, card=card, folder=folder, onnx_fallback=fallback)
    return MorphologyModel(model=model, config=cfg, card=card, folder=folder)
