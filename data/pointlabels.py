"""Point-labelled fields (Chula RBC-12) as extra detector training data.

Chula RBC-12 marks red cells with centre points, not boxes, and its fields come from another
lab (other stain, other scope, cells ~39 px instead of BCCD's ~100 px). The BCCD detector misses
whole Chula fields whose look it never saw (a grey-blue background, the elliptocyte batch), so
the fix is to show it such fields. A point becomes a box, in order of trust:

1. the box of a detected RBC (from the current detector) that contains the point, if the
   detector found the cell;
2. otherwise the connected foreground region (Otsu mask on the distance from the background
   colour) that holds the point, when its size is plausible for one cell;
3. otherwise a square of the field's median cell size centred on the point.

Chula does not label every cell of every field, so confident detections (>= ``pseudo_conf``)
that hold no labelled point are kept as pseudo-labels; unlabelled cells would otherwise teach
the detector to ignore real cells. Fields are resized by ``scale`` to the detector's training
scale and cut into one window of the training size, placed where the labelled points are
densest. Only the images of the given split ids are used (split by image, never by cell).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from smear.configs.errors import ImageReadError

from .boxes import iou_matrix
from .chula import read_chula
from .formats import parse_yolo_line, yolo_lines
from .images import cell_mask, read_bgr
from .splits import hash_fraction
from .taxonomy import GROUPS

#: ``propose(rgb, scale)`` -> detections of one field with ``boxes`` (N, 4 xyxy, that field's pixels), ``scores`` and
#: ``classes`` (indices into GROUPS): a detector's predict, passed in so that data never imports a model stage
ProposeBoxes = Callable[[np.ndarray, float], Any]

log = logging.getLogger(__name__)


@dataclass
class PointField:
    """One point-labelled field turned into a training window."""

    image_id: str
    points: int
    boxes_from_detector: int
    boxes_from_mask: int
    boxes_from_median: int
    pseudo_labels: int
    points_found_by_detector: float


def _single_cell(stat: np.ndarray, median_side: float, min_short: float = 0.45) -> bool:
    """A mask region that is plausibly one red cell: a cell's size (elliptocytes are long and thin) and filled like an ellipse.

    Touching cells make larger, less filled regions; platelets and debris make small ones.
    """
    _, _, bw, bh, area = (int(v) for v in stat[:5])
    long_side, short_side = max(bw, bh), min(bw, bh)
    return (min_short * median_side <= short_side and long_side <= 1.6 * median_side
            and area >= 0.6 * bw * bh)


def cell_regions(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected foreground regions of a field: ``(label image, stats)`` as cv2.connectedComponentsWithStats gives them."""
    import cv2

    _, comp, stats, _ = cv2.connectedComponentsWithStats(cell_mask(bgr), connectivity=4)
    return comp, stats


def point_boxes(bgr: np.ndarray, points: Sequence[tuple[float, float]], detected_rbc: np.ndarray,
                default_side_px: float, regions: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, list[str]]:
    """One xyxy box per point (in ``bgr`` pixels) and where each came from: detector, mask or median.

    ``regions`` is ``cell_regions(bgr)``, when the caller already has it.
    """
    median_side = _median_side(detected_rbc, default_side_px)
    comp, stats = regions if regions is not None else cell_regions(bgr)
    h, w = comp.shape
    boxes, sources = [], []
    for x, y in points:
        if len(detected_rbc):
            inside = points_in_boxes([(x, y)], detected_rbc)[:, 0]
            if inside.any():
                cand = detected_rbc[inside]
                centres = np.stack([(cand[:, 0] + cand[:, 2]) / 2, (cand[:, 1] + cand[:, 3]) / 2], 1)
                boxes.append(cand[int(np.argmin(((centres - (x, y)) ** 2).sum(1)))])
                sources.append("detector")
                continue
        xi, yi = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
        k = comp[yi, xi]
        if k > 0:
            bx, by, bw, bh = stats[k, :4]
            if _single_cell(stats[k], median_side) and abs(bx + bw / 2 - x) <= 0.3 * bw and abs(by + bh / 2 - y) <= 0.3 * bh:
                boxes.append(np.array([bx, by, bx + bw, by + bh], np.float32))
                sources.append("mask")
                continue
        half = median_side / 2
        boxes.append(np.array([max(0, x - half), max(0, y - half), min(w, x + half), min(h, y + half)], np.float32))
        sources.append("median")
    return (np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)), sources


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n_boxes, n_points) bool: whether each point (x, y) lies inside each xyxy box, edges included."""
    points, boxes = np.asarray(points, np.float32).reshape(-1, 2), np.asarray(boxes, np.float32).reshape(-1, 4)
    return ((boxes[:, None, 0] <= points[None, :, 0]) & (points[None, :, 0] <= boxes[:, None, 2])
            & (boxes[:, None, 1] <= points[None, :, 1]) & (points[None, :, 1] <= boxes[:, None, 3]))


def _median_side(rbc_boxes: np.ndarray, default_side_px: float) -> float:
    """The field's median RBC box side, or the default when fewer than 5 RBCs were detected."""
    if len(rbc_boxes) < 5:
        return default_side_px
    return float(np.median(((rbc_boxes[:, 2] - rbc_boxes[:, 0]) + (rbc_boxes[:, 3] - rbc_boxes[:, 1])) / 2))


def unlabelled_cell_regions(bgr: np.ndarray, points: np.ndarray, boxes: np.ndarray, median_side: float,
                            regions: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Boxes of single-cell mask regions that hold no labelled point and overlap none of ``boxes``.

    ``regions`` is ``cell_regions(bgr)``, when the caller already has it.
    """
    _, stats = regions if regions is not None else cell_regions(bgr)
    h, w = bgr.shape[:2]
    out = []
    for st in stats[1:]:
        bx, by, bw, bh = (int(v) for v in st[:4])
        if bx == 0 or by == 0 or bx + bw >= w or by + bh >= h or not _single_cell(st, median_side, min_short=0.6):
            continue  # cut by the field edge, or not one cell
        b = np.array([bx, by, bx + bw, by + bh], np.float32)
        if points_in_boxes(points, b).any():
            continue
        if len(boxes) and iou_matrix(b[None], boxes).max() >= 0.2:
            continue
        out.append(b)
    return np.stack(out) if out else np.zeros((0, 4), np.float32)


def densest_window(points: np.ndarray, size: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the ``window`` (w, h) inside ``size`` (w, h) that holds the most points."""
    (w, h), (ww, wh) = size, window
    if w <= ww and h <= wh:
        return 0, 0
    best, best_xy = -1, (0, 0)
    xs = np.unique(np.clip(np.linspace(0, max(0, w - ww), 9).astype(int), 0, None))
    ys = np.unique(np.clip(np.linspace(0, max(0, h - wh), 9).astype(int), 0, None))
    for y0 in ys:
        for x0 in xs:
            n = int(((points[:, 0] >= x0) & (points[:, 0] < x0 + ww) & (points[:, 1] >= y0)
                     & (points[:, 1] < y0 + wh)).sum()) if len(points) else 0
            if n > best:
                best, best_xy = n, (int(x0), int(y0))
    return best_xy


def clip_to_window(boxes: np.ndarray, x0: int, y0: int, ww: int, wh: int, min_visible: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boxes shifted into a window and clipped; those with less than ``min_visible`` of their area inside are dropped.

    Returns the clipped boxes and the indices of the kept ones.
    """
    if not len(boxes):
        return boxes, np.zeros(0, np.int64)
    b = boxes - np.array([x0, y0, x0, y0], np.float32)
    c = np.stack([np.clip(b[:, 0], 0, ww), np.clip(b[:, 1], 0, wh), np.clip(b[:, 2], 0, ww), np.clip(b[:, 3], 0, wh)], 1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = np.nonzero((vis >= min_visible * np.maximum(area, 1e-6)) & (c[:, 2] - c[:, 0] >= 2) & (c[:, 3] - c[:, 1] >= 2))[0]
    return c[keep], keep


def add_point_labelled_fields(yolo_dir: Path, chula_root: Path, image_ids: Iterable[str], scale: float,
                              propose: ProposeBoxes, default_side_px: float = 100.0,
                              window: tuple[int, int] = (640, 480), pseudo_conf: float = 0.5, split: str = "train",
                              prefix: str = "chula") -> list[PointField]:
    """Write one training window per point-labelled field into ``yolo_dir/{images,labels}/split``.

    ``propose(rgb, scale)`` gives a field's detections (boxes in its own pixels, scores, group indices),
    e.g. a detector's; ``default_side_px`` is the RBC side assumed where a field has too few.

    Also writes ``yolo_dir/point_fields_<split>.csv`` (one row per field: where each box came from).
    """
    import cv2

    data = read_chula(chula_root)
    rbc = GROUPS.index("RBC")
    img_dir, lbl_dir = Path(yolo_dir) / "images" / split, Path(yolo_dir) / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    default_side = float(default_side_px)
    rows: list[PointField] = []
    for image_id in image_ids:
        cells = data.get(image_id)
        if not cells:
            continue
        try:
            bgr0 = read_bgr(cells[0].image)
        except ImageReadError:
            log.warning("%s: cannot be decoded, skipped", cells[0].image)
            continue
        bgr = cv2.resize(bgr0, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        h, w = bgr.shape[:2]
        found = propose(cv2.cvtColor(bgr0, cv2.COLOR_BGR2RGB), scale)
        found_boxes = found.boxes * scale
        pts = np.array([(c.x * scale, c.y * scale) for c in cells], np.float32)
        det_rbc = found_boxes[found.classes == rbc]
        regions = cell_regions(bgr)
        boxes, sources = point_boxes(bgr, [tuple(p) for p in pts], det_rbc, default_side, regions)
        in_det = sum(s == "detector" for s in sources)
        # Pseudo-labels for the cells Chula left unlabelled: confident detections (WBCs only when very
        # confident: the BCCD detector takes some large Chula RBCs for WBCs), then single-cell mask
        # regions; none may hold a labelled point or overlap a box already kept.
        holds_point = points_in_boxes(pts, found_boxes).any(1)
        min_conf = np.where(found.classes == GROUPS.index("WBC"), max(pseudo_conf, 0.8), pseudo_conf)
        overl = iou_matrix(found_boxes, boxes).max(1) if len(boxes) else np.zeros(len(found_boxes))
        pseudo = (found.scores >= min_conf) & ~holds_point & (overl < 0.3)
        all_boxes = np.concatenate([boxes, found_boxes[pseudo]])
        all_classes = np.concatenate([np.full(len(boxes), rbc), found.classes[pseudo]]).astype(int)
        mask_boxes = unlabelled_cell_regions(bgr, pts, all_boxes, _median_side(det_rbc, default_side), regions)
        all_boxes = np.concatenate([all_boxes, mask_boxes])
        all_classes = np.concatenate([all_classes, np.full(len(mask_boxes), rbc)]).astype(int)
        n_pseudo = int(pseudo.sum()) + len(mask_boxes)
        ww, wh = min(window[0], w), min(window[1], h)
        x0, y0 = densest_window(pts, (w, h), (ww, wh))
        clipped, keep = clip_to_window(all_boxes, x0, y0, ww, wh)
        name = f"{prefix}_{image_id}"
        cv2.imwrite(str(img_dir / f"{name}.jpg"), bgr[y0:y0 + wh, x0:x0 + ww], [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines = yolo_lines(clipped, all_classes[keep], (ww, wh))
        (lbl_dir / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        rows.append(PointField(image_id, len(cells), in_det, sources.count("mask"), sources.count("median"),
                               n_pseudo, round(in_det / len(cells), 3)))
    with open(Path(yolo_dir) / f"point_fields_{split}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(PointField.__dataclass_fields__))
        wr.writeheader()
        wr.writerows([r.__dict__ for r in rows])
    return rows


def read_yolo_boxes(label_file: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A YOLO label file as pixel boxes (x1, y1, x2, y2) and class indices."""
    lines = Path(label_file).read_text().splitlines() if Path(label_file).is_file() else []
    parsed = [p for p in (parse_yolo_line(line, size) for line in lines) if p is not None]
    return (np.array([b for _, b, _ in parsed], np.float32).reshape(-1, 4),
            np.array([c for c, _, _ in parsed], int))


def pseudo_label_split(yolo_dir: Path, propose: ProposeBoxes, split: str = "train",
                       conf: float = 0.5, wbc_conf: float = 0.8, max_iou: float = 0.3) -> list[dict]:
    """Add confident detections that no label covers to the labels of one split, in place.

    For sets whose annotators skipped cells (BCCD leaves many RBCs, and a few WBCs, without a box): a
    detection becomes a label when it scores at least ``conf`` (WBCs ``wbc_conf``; platelets are left as
    labelled) and overlaps no labelled box of any class above ``max_iou``. Only ever for a training split:
    labels of the splits that choose and report models stay as published. Writes
    ``yolo_dir/pseudo_labels_<split>.csv`` (per image: labelled boxes, pseudo-labels added per class).
    """
    import cv2

    from smear.configs.errors import SmearError
    if split != "train":
        raise SmearError(f"pseudo-labels go into the training split only, not '{split}'")
    img_dir, lbl_dir = Path(yolo_dir) / "images" / split, Path(yolo_dir) / "labels" / split
    floor = {GROUPS.index("RBC"): conf, GROUPS.index("WBC"): wbc_conf}
    rows = []
    for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        try:
            bgr = read_bgr(img_path)
        except ImageReadError:
            log.warning("%s: cannot be decoded, skipped", img_path)
            continue
        h, w = bgr.shape[:2]
        label_file = lbl_dir / f"{img_path.stem}.txt"
        boxes, classes = read_yolo_boxes(label_file, (w, h))
        found = propose(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 1.0)
        need = np.array([floor.get(int(c), 2.0) for c in found.classes], np.float32)
        overl = iou_matrix(found.boxes, boxes).max(1) if len(boxes) else np.zeros(len(found))
        new = (found.scores >= need) & (overl <= max_iou)
        # two confident detections on one unlabelled cell: keep the higher-scoring one only
        order = [int(i) for i in np.argsort(-found.scores) if new[i]]
        kept: list[int] = []
        for i in order:
            if not kept or iou_matrix(found.boxes[i:i + 1], found.boxes[kept]).max() <= max_iou:
                kept.append(i)
        lines = yolo_lines(found.boxes[kept], found.classes[kept], (w, h))
        if lines:
            text = label_file.read_text() if label_file.is_file() else ""
            label_file.write_text(text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(lines) + "\n")
        rows.append({"image": img_path.name, "labelled": len(boxes),
                     **{f"pseudo_{g}": sum(int(found.classes[i]) == GROUPS.index(g) for i in kept) for g in GROUPS}})
    with open(Path(yolo_dir) / f"pseudo_labels_{split}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "labelled"] + [f"pseudo_{g}" for g in GROUPS])
        wr.writeheader()
        wr.writerows(rows)
    return rows


def sample_ids(image_ids: Sequence[str], max_images: int, seed: int = 0) -> list[str]:
    """A deterministic sample of at most ``max_images`` ids (hash order), returned in input order."""
    if not max_images or len(image_ids) <= max_images:
        return list(image_ids)
    key = lambda i: hash_fraction(f"points:{seed}:{i}")  # noqa: E731
    chosen = set(sorted(image_ids, key=key)[:max_images])
    return [i for i in image_ids if i in chosen]


def build_point_augmented_set(base_yolo: Path, out: Path, chula_root: Path, train_ids: Sequence[str], scale: float,
                              propose: ProposeBoxes, default_side_px: float = 100.0,
                              max_images: int = 0) -> tuple[Path, list[PointField]]:
    """Copy a prepared YOLO set to ``out/yolo`` and add point-labelled training windows; returns its data.yaml.

    Validation and test stay the base set's (BCCD), so model selection is unchanged.
    """
    yolo = copy_yolo_set(base_yolo, out)
    ids = sample_ids(list(train_ids), max_images)
    rows = add_point_labelled_fields(yolo, chula_root, ids, scale, propose, default_side_px)
    return yolo / "data.yaml", rows


def copy_yolo_set(base_yolo: Path, out: Path) -> Path:
    """Copy a prepared YOLO set to ``out/yolo`` (label caches left behind), its data.yaml pointing at the copy."""
    import shutil

    import yaml

    from smear.configs.errors import SmearError

    base_yolo, yolo = Path(base_yolo), Path(out) / "yolo"
    if not (base_yolo / "data.yaml").is_file():
        raise SmearError(f"{base_yolo / 'data.yaml'}: not found; make it with 'smear data prepare'")
    if yolo.exists():
        raise SmearError(f"{yolo}: exists; choose another --out or remove it")
    shutil.copytree(base_yolo, yolo, ignore=shutil.ignore_patterns("*.cache"))
    cfg = yaml.safe_load((base_yolo / "data.yaml").read_text())
    cfg["path"] = str(yolo.resolve())
    (yolo / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return yolo


def estimate_cell_count(bgr: np.ndarray) -> float:
    """Red cells in a field estimated from its foreground mask, independent of any detector.

    Total foreground area divided by the median area of the regions that look like one cell, so
    clumps count as the cells they hold. Used to tell fields whose every cell carries a point
    from fields where only some do (RBC counting can be judged only on the former).
    """
    regions = cell_regions(bgr)[1][1:]
    if not len(regions):
        return 0.0
    sides = np.sqrt(regions[:, 4].astype(np.float64))
    singles = [st for st in regions if _single_cell(st, float(np.median(sides)) * 1.15, min_short=0.6)]
    if not singles:
        return 0.0
    one_cell = float(np.median([st[4] for st in singles]))
    big = regions[regions[:, 4] >= 0.3 * one_cell]  # specks (platelets, debris) are not red cells
    return float(big[:, 4].sum() / one_cell)
