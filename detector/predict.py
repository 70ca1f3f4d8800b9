"""Run the detector on fields of any size: letterboxed at native aspect, tiled when large."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from smear.configs.offline import ensure_offline, use_cpu_threads
from smear.data.taxonomy import GROUPS

from .config import DetectorConfig
from .model import DetectorModelInfo, find_detector, load_yolo

log = logging.getLogger(__name__)

# RBC diameter used to bring images from other microscopes to the training scale.
RBC_DIAMETER_UM = 7.5
# scale="auto": a field whose RBCs are within this factor of the training size is detected as it is
AUTO_SCALE_TOLERANCE = 1.2
# scale="auto": resize factors tried, in order, when the first pass finds too few RBCs to measure
AUTO_SCALE_PROBES = (0.5, 2.0, 0.25, 4.0)
# RBC size assumed for a detector whose card does not record its training RBC size (BCCD's, px)
RBC_DIAMETER_PX_DEFAULT = 100.0


@dataclass
class Detections:
    """Boxes of one image in original pixels: ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``classes`` (N,) index into GROUPS.

    ``scale`` is the resize factor the image was detected at; ``rbc_diameter_px`` the median RBC box side (in the
    image's own pixels) that ``scale="auto"`` measured, and ``warning`` what went wrong with that, if anything;
    ``stain_mapped_to`` the training lab whose colours the field was given before detection (None: as it was).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    scale: float = 1.0
    rbc_diameter_px: float | None = None
    warning: str | None = None
    stain_mapped_to: str | None = None  # the training lab whose colours the field was mapped onto (stain_norm)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, keep: np.ndarray) -> "Detections":
        """The boxes ``keep`` selects (a mask or indices), with this image's scale, RBC size and warning."""
        return dataclasses.replace(self, boxes=self.boxes[keep], scores=self.scores[keep], classes=self.classes[keep])

    def labels(self) -> list[str]:
        return [GROUPS[int(c)] for c in self.classes]


def concat_detections(first: Detections, *more: Detections) -> Detections:
    """The boxes of ``first`` and then of ``more`` (boxes of the same image), with ``first``'s scale, RBC size and
    warning."""
    parts = (first, *more)
    return dataclasses.replace(first, boxes=np.concatenate([d.boxes for d in parts]).astype(first.boxes.dtype),
                               scores=np.concatenate([d.scores for d in parts]).astype(first.scores.dtype),
                               classes=np.concatenate([d.classes for d in parts]).astype(first.classes.dtype))


def at_border(boxes: np.ndarray, size: tuple[int, int], edge_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Which xyxy boxes touch the field's left/right edge and which its top/bottom edge (within ``edge_px``)."""
    w, h = size
    return ((boxes[:, 0] <= edge_px) | (boxes[:, 2] >= w - edge_px),
            (boxes[:, 1] <= edge_px) | (boxes[:, 3] >= h - edge_px))


def drop_edge_fragments(det: Detections, size: tuple[int, int], min_visible: float,
                        groups: Sequence[str] = ("RBC",), edge_px: float = 1.0) -> Detections:
    """Drop boxes cut by the field border with less than ``min_visible`` of a typical cell inside.

    Counting convention: a cell cut by the field edge belongs to the field that holds its centre,
    so neighbouring fields (or tiles of a slide) count it once and slivers at the border do not
    inflate a field's count. A box touching the border is a fragment when its extent across that
    border is below ``min_visible`` x the typical diameter of its class in this field (median of
    the mean side of its boxes clear of the border; all its boxes when fewer than 3 are clear).
    ``min_visible`` 0 keeps everything. Only ``groups`` are judged (RBCs by default: their many
    boxes give a stable typical size; a lone WBC has no reference).
    """
    if min_visible <= 0 or not len(det):
        return det
    b = det.boxes
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    at_x, at_y = at_border(b, size, edge_px)
    drop = np.zeros(len(b), bool)
    for g in groups:
        of = det.classes == GROUPS.index(g)
        clear = of & ~at_x & ~at_y
        ref = clear if clear.sum() >= 3 else of
        if not ref.any():
            continue
        side = float(np.median((bw[ref] + bh[ref]) / 2))
        drop |= of & ((at_x & (bw < min_visible * side)) | (at_y & (bh < min_visible * side)))
    if not drop.any():
        return det
    return det.subset(~drop)


def median_rbc_side(det: Detections, size: tuple[int, int], min_cells: int = 3) -> float | None:
    """Median side (mean of width and height) of the RBC boxes clear of the field border; None below ``min_cells``."""
    if not len(det):
        return None
    at_x, at_y = at_border(det.boxes, size)
    rbc = (det.classes == GROUPS.index("RBC")) & ~at_x & ~at_y
    if rbc.sum() < min_cells:
        return None
    b = det.boxes[rbc]
    return float(np.median(((b[:, 2] - b[:, 0]) + (b[:, 3] - b[:, 1])) / 2))


def keep_above(det: Detections, thresholds: Mapping[str, float]) -> Detections:
    """Keep the boxes whose score reaches their class's threshold (classes not named keep everything)."""
    if not len(det):
        return det
    floor = np.array([thresholds.get(g, 0.0) for g in GROUPS], np.float32)[det.classes]
    keep = det.scores >= floor
    if keep.all():
        return det
    return det.subset(keep)


# wbc_rescue: the lowest detector score of a WBC box the classifier may keep, and the share of its own area a kept
# box may cover (more, and it is a part of that cell)
RESCUE_MIN_SCORE = 0.02
RESCUE_MAX_COVER = 0.3


def low_wbc_mask(det: Detections, kept: np.ndarray, wbc_threshold: float) -> np.ndarray:
    """The WBC boxes of ``det`` a second opinion (the classifier's) may keep although ``kept`` (a mask) leaves them:
    scored from :data:`RESCUE_MIN_SCORE` up to ``wbc_threshold``, and covered by no kept box for
    :data:`RESCUE_MAX_COVER` or more of their own area (a part of a kept cell is no cell of its own)."""
    low = (~kept & (det.classes == GROUPS.index("WBC")) & (det.scores >= RESCUE_MIN_SCORE)
           & (det.scores < wbc_threshold))
    if low.any():
        low[low] = covered_share(det.boxes[low], det.boxes[kept]) < RESCUE_MAX_COVER
    return low


def low_wbc_candidates(det: Detections, wbc_threshold: float) -> tuple[Detections, Detections]:
    """``det`` (found down to a lower WBC score) split into the boxes that reach their thresholds and the WBC
    candidates under ``wbc_threshold`` (:func:`low_wbc_mask`). Boxes of the other groups are as ``det`` gave them."""
    kept = ~((det.classes == GROUPS.index("WBC")) & (det.scores < wbc_threshold))
    return det.subset(kept), det.subset(low_wbc_mask(det, kept, wbc_threshold))


def covered_share(boxes: np.ndarray, by: np.ndarray) -> np.ndarray:
    """For each xyxy box of ``boxes``, the largest share of its own area that one box of ``by`` covers (0 if none)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    by = np.asarray(by, np.float64).reshape(-1, 4)
    if not len(boxes) or not len(by):
        return np.zeros(len(boxes))
    a, b = boxes[:, None, :], by[None, :, :]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area = np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6, None)
    return (inter / area[:, None]).max(1)


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` with at least ``overlap`` shared pixels."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


def merge_tiles(parts: list[tuple[Detections, tuple[int, int, int, int]]], size: tuple[int, int], iou: float,
                edge_px: float = 2.0) -> Detections:
    """Merge per-tile detections (each with its tile xyxy in image pixels) into one set.

    A box touching an inner tile edge is cut by that edge; the overlap (larger than any cell)
    guarantees a neighbouring tile holds the whole cell, so cut boxes are dropped, then
    class-wise NMS removes the copies of cells seen whole by two tiles.
    """
    import torch
    import torchvision

    w, h = size
    keep_boxes, keep_scores, keep_classes = [], [], []
    for det, (tx1, ty1, tx2, ty2) in parts:
        if not len(det):
            continue
        b = det.boxes
        cut = np.zeros(len(b), bool)
        if tx1 > 0:
            cut |= b[:, 0] <= tx1 + edge_px
        if ty1 > 0:
            cut |= b[:, 1] <= ty1 + edge_px
        if tx2 < w:
            cut |= b[:, 2] >= tx2 - edge_px
        if ty2 < h:
            cut |= b[:, 3] >= ty2 - edge_px
        keep_boxes.append(b[~cut])
        keep_scores.append(det.scores[~cut])
        keep_classes.append(det.classes[~cut])
    if not keep_boxes:
        return Detections.empty()
    boxes = np.concatenate(keep_boxes)
    scores = np.concatenate(keep_scores)
    classes = np.concatenate(keep_classes)
    if not len(boxes):
        return Detections.empty()
    keep = torchvision.ops.batched_nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(),
                                       torch.from_numpy(classes), iou).numpy()
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return Detections(boxes[keep], scores[keep], classes[keep])


class OnnxYolo:
    """An ultralytics YOLO detector exported to ONNX ('smear detector export'), run by ONNX Runtime through
    ultralytics' own steps around the network (letterbox, NMS, boxes back to image pixels), so it finds the
    boxes ultralytics' predict finds, without ultralytics' ONNX backend (which would install the onnx package
    at run time when it is missing, and chooses its own threads).
    """

    def __init__(self, weights: str | Path, threads: int):
        import ast

        from smear.configs.runtime import onnx_session

        self.weights = Path(weights)
        self.session = onnx_session(self.weights, threads)
        meta = self.session.get_modelmeta().custom_metadata_map  # ultralytics' export writes names and stride
        names = ast.literal_eval(meta["names"]) if "names" in meta else {}
        self.names = dict(enumerate(names)) if isinstance(names, list) else names
        self.stride = int(meta.get("stride", 32))
        shape = self.session.get_inputs()[0].shape
        self.fixed_size = list(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None

    def predict(self, images_bgr: Sequence[np.ndarray], imgsz: int, conf: float, iou: float,
                max_det: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(xyxy, scores, class indices)`` per BGR image, as ultralytics' predict gives them."""
        import torch
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils import nms, ops
        from ultralytics.utils.checks import check_imgsz

        size = self.fixed_size or check_imgsz(imgsz, stride=self.stride, min_dim=2)
        same_shapes = len({im.shape for im in images_bgr}) == 1  # as ultralytics: one batch shape, else squares
        letterbox = LetterBox(size, auto=same_shapes and self.fixed_size is None, stride=self.stride)
        batch = np.stack([letterbox(image=im) for im in images_bgr])
        x = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2)).astype(np.float32) / 255  # RGB, 0-1
        raw = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        found = nms.non_max_suppression(torch.from_numpy(raw), conf, iou, None, False, max_det=max_det)
        out = []
        for pred, im in zip(found, images_bgr):
            pred[:, :4] = ops.scale_boxes(x.shape[2:], pred[:, :4], im.shape)
            p = pred.numpy()
            out.append((p[:, :4].astype(np.float32), p[:, 4].astype(np.float32), p[:, 5].astype(np.int64)))
        return out


class Detector:
    """A loaded detector. ``predict`` takes RGB uint8 arrays and returns :class:`Detections`.

    Example:
        >>> det = Detector()               # the shipped model
        >>> found = det.predict([image])[0]
    """

    def __init__(self, weights: str | Path | None = None, cfg: DetectorConfig | None = None, device: str | None = None,
                 threads: int | None = None, stain_norm: bool = False, runtime: str = "torch"):
        from .stain import StainReference

        ensure_offline()
        # runtime "onnx": the folder's weights.onnx under ONNX Runtime when it has a current one (info.onnx_fallback
        # says why not); an .onnx file always runs there
        self.info: DetectorModelInfo = find_detector(weights, runtime=runtime)
        # stain_norm: fields unlike the card's training labs' colours are mapped onto the nearest (smear.detector.stain)
        self.stain = StainReference.from_card(self.info.card) if stain_norm else None
        card_cfg = self.info.card.get("config", {})
        base = cfg or DetectorConfig()
        self.cfg = base
        self.imgsz = int(card_cfg.get("imgsz", base.imgsz)) if cfg is None else base.imgsz
        self.device = device or base.device
        self.threads = use_cpu_threads(base.threads if threads is None else threads)  # held through ultralytics' pick
        self.model = self._load_onnx() if self.runtime == "onnx" else load_yolo(self.info.weights)
        names = self.model.names
        self._class_map = {}
        for idx, name in (names.items() if isinstance(names, dict) else enumerate(names)):
            from smear.data.taxonomy import _canonical_label

            canon = _canonical_label(str(name))
            if canon not in GROUPS:
                raise ValueError(f"{self.info.weights}: detector class '{name}' is not one of {GROUPS}")
            self._class_map[int(idx)] = GROUPS.index(canon)

    @property
    def runtime(self) -> str:
        """``onnx`` (ONNX Runtime on the CPU) or ``torch`` (ultralytics on ``self.device``)."""
        return self.info.runtime

    def _load_onnx(self):
        """The ONNX model; when ONNX Runtime cannot read the file and the folder holds a weights.pt, that one."""
        from smear.configs.errors import SmearError
        from smear.configs.runtime import unreadable

        onnx = self.info.weights
        try:
            return OnnxYolo(onnx, self.threads)
        except Exception as e:  # noqa: BLE001  a truncated or corrupt file: one line, and the .pt if there is one
            why = unreadable(onnx, e, f"smear detector export --weights {onnx.parent} --in-place")
            if not (onnx.parent / "weights.pt").is_file():
                raise SmearError(why) from None
            self.info = DetectorModelInfo(onnx.parent / "weights.pt", self.info.card, onnx_fallback=why)
            return load_yolo(self.info.weights)

    def _run(self, images_bgr: list[np.ndarray], conf: float, iou: float) -> list[Detections]:
        if isinstance(self.model, OnnxYolo):
            return [Detections(b, s, np.array([self._class_map[int(c)] for c in k], dtype=np.int64))
                    if len(s) else Detections.empty()
                    for b, s, k in self.model.predict(images_bgr, self.imgsz, conf, iou, self.cfg.max_det)]
        results = self.model.predict(images_bgr, imgsz=self.imgsz, conf=conf, iou=iou, device=self.device,
                                     max_det=self.cfg.max_det, verbose=False)
        out = []
        for r in results:
            b = r.boxes
            if b is None or len(b) == 0:
                out.append(Detections.empty())
                continue
            cls = np.array([self._class_map[int(c)] for c in b.cls.cpu().numpy()], dtype=np.int64)
            out.append(Detections(b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32), cls))
        return out

    def predict(self, images_rgb: Sequence[np.ndarray], conf: float | Mapping[str, float] | None = None,
                iou: float | None = None, scale: float | str = 1.0,
                measure_conf: float | None = None) -> list[Detections]:
        """Detect cells. ``scale`` resizes images first (e.g. 2.0 for a microscope imaging cells half as large);
        ``"auto"`` measures each image's RBC size and brings it to the training scale (:meth:`predict_auto_scale`).

        ``conf`` is one minimum score, or one per group (``{"RBC": 0.4, "Platelets": 0.55, ...}``: the model
        runs at the lowest, then each box must reach its own group's). Fields are stain-normalised first when
        the card carries a reference (``self.stain``). ``measure_conf``: with ``scale="auto"``, only RBC boxes
        scored at least this give the image's RBC size (default: the lowest threshold the model runs at), so a
        caller that asks for low-scored boxes of one group does not move the scale of every other.
        """
        mapped: list[str | None] = [None] * len(images_rgb)
        if self.stain is not None:
            pairs = [self.stain.normalise(im) for im in images_rgb]
            images_rgb, mapped = [im for im, _ in pairs], [lab for _, lab in pairs]
        if isinstance(conf, Mapping):
            thresholds = {g: float(conf.get(g, self.cfg.conf)) for g in GROUPS}
            found = [keep_above(d, thresholds)
                     for d in self._predict(images_rgb, min(thresholds.values()), iou, scale, measure_conf)]
        else:
            found = self._predict(images_rgb, conf, iou, scale, measure_conf)
        for det, lab in zip(found, mapped):
            det.stain_mapped_to = lab
        return found

    def _predict(self, images_rgb: Sequence[np.ndarray], conf: float | None, iou: float | None,
                 scale: float | str, measure_conf: float | None = None) -> list[Detections]:
        """:meth:`predict` on fields already normalised, at one minimum score."""
        if scale == "auto":
            return self._predict_auto_scale(images_rgb, conf, iou, measure_conf)
        import cv2

        conf = self.cfg.conf if conf is None else conf
        iou = self.cfg.iou if iou is None else iou
        results: list[Detections | None] = [None] * len(images_rgb)
        small: list[tuple[int, np.ndarray]] = []
        for i, img in enumerate(images_rgb):
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            if scale != 1.0:
                bgr = cv2.resize(bgr, None, fx=scale, fy=scale,
                                 interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            h, w = bgr.shape[:2]
            if max(h, w) > 1.5 * self.cfg.tile_px:
                results[i] = self._predict_tiled(bgr, conf, iou)
            else:
                small.append((i, bgr))
        if small:
            for (i, _), det in zip(small, self._run([b for _, b in small], conf, iou)):
                results[i] = det
        if scale != 1.0:
            for det in results:
                det.boxes /= scale
                det.scale = float(scale)
        return results  # type: ignore[return-value]

    def _predict_tiled(self, bgr: np.ndarray, conf: float, iou: float) -> Detections:
        h, w = bgr.shape[:2]
        tile, overlap = self.cfg.tile_px, self.cfg.tile_overlap_px
        windows = [(x, y, min(x + tile, w), min(y + tile, h))
                   for y in tile_origins(h, tile, overlap) for x in tile_origins(w, tile, overlap)]
        parts = []
        for k in range(0, len(windows), 8):
            chunk = windows[k:k + 8]
            dets = self._run([bgr[y1:y2, x1:x2] for x1, y1, x2, y2 in chunk], conf, iou)
            for (x1, y1, x2, y2), d in zip(chunk, dets):
                if len(d):
                    d.boxes[:, [0, 2]] += x1
                    d.boxes[:, [1, 3]] += y1
                parts.append((d, (x1, y1, x2, y2)))
        return merge_tiles(parts, (w, h), iou)

    @property
    def training_rbc_diameter_px(self) -> float:
        """Median RBC box side of the training fields (card), the scale ``scale="auto"`` brings images to."""
        return float(self.info.card.get("rbc_median_diameter_px") or RBC_DIAMETER_PX_DEFAULT)

    def predict_auto_scale(self, images_rgb: Sequence[np.ndarray], conf: float | None = None,
                           iou: float | None = None) -> list[Detections]:
        """Detect each image at the scale where its RBCs match the training fields' RBC size
        (``predict(..., scale="auto")``; see :meth:`_predict_auto_scale`)."""
        return self.predict(images_rgb, conf, iou, scale="auto")

    def _predict_auto_scale(self, images_rgb: Sequence[np.ndarray], conf: float | None = None,
                            iou: float | None = None, measure_conf: float | None = None) -> list[Detections]:
        """Detect each image at the scale where its RBCs match the training fields' RBC size.

        Each image is first detected as it is (a large one shrunk to one tile, so the pass stays cheap);
        the median RBC box side there gives the image's RBC size. When it is within ``AUTO_SCALE_TOLERANCE``
        of the training size the first pass is the answer; otherwise the image is detected again at
        ``training size / measured size`` (tiled when that makes it large). When too few RBCs are found
        the image is probed at other scales; when none finds cells, the result carries a warning.
        """
        conf = self.cfg.conf if conf is None else conf
        target = self.training_rbc_diameter_px

        def rbc_size(det: Detections, size: tuple[int, int]) -> float | None:
            if measure_conf is not None and measure_conf > conf and len(det):
                det = det.subset(det.scores >= measure_conf)
            return median_rbc_side(det, size)

        out: list[Detections | None] = [None] * len(images_rgb)
        first: dict[int, float] = {}
        for i, img in enumerate(images_rgb):
            h, w = img.shape[:2]
            first[i] = min(1.0, self.cfg.tile_px / max(h, w)) if max(h, w) > 1.5 * self.cfg.tile_px else 1.0
        native = [i for i, k in first.items() if k == 1.0]
        found = dict(zip(native, self._predict([images_rgb[i] for i in native], conf, iou, 1.0))) if native else {}
        for i, img in enumerate(images_rgb):
            size = (img.shape[1], img.shape[0])
            first_pass = found[i] if i in found else self._predict([img], conf, iou, scale=first[i])[0]
            measured = rbc_size(first_pass, size)
            probes = [k for k in AUTO_SCALE_PROBES if k != first[i]]
            while measured is None and probes:  # too few RBCs: try cells of another size
                measured = rbc_size(self._predict([img], conf, iou, scale=probes.pop(0) * first[i])[0], size)
            if measured is None:
                first_pass.warning = (f"no scale between x{min(AUTO_SCALE_PROBES) * first[i]:g} and "
                                      f"x{max(AUTO_SCALE_PROBES) * first[i]:g} found RBCs to measure; detected as it "
                                      f"is (x{first[i]:g}); give --scale or --pixel-size-um")
                out[i] = first_pass
                continue
            k = target / measured
            if first[i] == 1.0 and abs(np.log(k)) <= np.log(AUTO_SCALE_TOLERANCE):
                det, k = first_pass, 1.0
            else:
                det = self._predict([img], conf, iou, scale=k)[0]
            det.scale, det.rbc_diameter_px = float(k), round(measured, 1)
            out[i] = det
        return out  # type: ignore[return-value]

    @property
    def train_pixel_size_um(self) -> float | None:
        """Pixel size of the training fields, from their median RBC diameter (card), if known."""
        d = self.info.card.get("rbc_median_diameter_px")
        return RBC_DIAMETER_UM / float(d) if d else None

    def scale_for_pixel_size(self, pixel_size_um: float) -> float:
        """Resize factor that brings an image of ``pixel_size_um`` to the training scale."""
        train = self.train_pixel_size_um
        if train is None:
            raise ValueError("this detector's card has no rbc_median_diameter_px; give an explicit scale instead")
        return pixel_size_um / train
