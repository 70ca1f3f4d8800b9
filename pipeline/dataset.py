"""Read VOC / YOLO / COCO box annotations, audit them, and write the two training sets.

``prepare_dataset`` turns a labelled source (BCCD by default) into:

1. ``yolo/``: a YOLO detection dataset (images, labels, ``data.yaml``), official split kept;
2. ``crops/``: one crop per box for the classifier plus ``manifest.csv``;
3. ``audit.csv``: every box fixed or dropped, and image-level notes, with the reason;
4. ``yolo/incomplete_labels.csv``: images known to lack a box of some class (a WBC the subtype table
   names but no WBC box holds), so evaluation can report metrics that ignore that class there.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import param
from .errors import SmearError

log = logging.getLogger(__name__)

GROUPS = ("RBC", "WBC", "Platelets")
SUBTYPES = ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil")
CELL_CLASSES = ("RBC", "Platelets") + SUBTYPES
SPLITS = ("train", "val", "test")
INCOMPLETE_LABELS = "incomplete_labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_NAME_ALIASES = {"rbc": "RBC", "wbc": "WBC", "platelets": "Platelets", "platelet": "Platelets", "plt": "Platelets"}


def group_of(label: str) -> str:
    """The detector group (RBC, WBC, Platelets) of a cell label."""
    if label in SUBTYPES or label == "WBC":
        return "WBC"
    return label


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


@dataclass
class Box:
    """One annotated box in original pixel coordinates."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class AnnotatedImage:
    """An image with its boxes, as read from a source."""

    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    split: str | None = None
    missing: list[str] = field(default_factory=list)  # groups whose boxes the audit found missing or wrong


@dataclass
class AuditRow:
    image_id: str
    label: str
    box: str
    action: str  # clipped, dropped, relabelled, note
    reason: str


def box_iou(a: Iterable[float], b: Iterable[float]) -> float:
    """IoU of two xyxy boxes."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------- readers

def _canonical_label(name: str) -> str:
    n = name.strip()
    if n in CELL_CLASSES or n in GROUPS:
        return n
    low = n.lower()
    for c in CELL_CLASSES:
        if c.lower() == low:
            return c
    return _NAME_ALIASES.get(low, n)


def _find_image(images_dir: Path, stem: str, filename: str | None) -> Path | None:
    if filename:
        p = images_dir / filename
        if p.is_file():
            return p
    for suf in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        p = images_dir / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def read_voc(source: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Read a VOC folder (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/Main``).

    A flat folder of XML files works too. With ``images``, images are looked up there
    (recursively, by file name) instead of next to the XML.
    """
    ann_dir = source / "Annotations" if (source / "Annotations").is_dir() else source
    xmls = sorted(ann_dir.rglob("*.xml"))
    if not xmls:
        raise SmearError(f"{source}: no VOC .xml annotations found (looked in {ann_dir})")
    image_index: dict[str, Path] = {}
    if images is not None:
        for p in images.rglob("*"):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                image_index.setdefault(p.name, p)
                image_index.setdefault(p.stem, p)
    default_images = source / "JPEGImages"
    out = []
    for x in xmls:
        try:
            root = ET.parse(x).getroot()
        except ET.ParseError as e:
            raise SmearError(f"{x}: not valid VOC XML ({e})") from None
        filename = (root.findtext("filename") or "").strip() or None
        stem = x.stem
        if images is not None:  # the XML's own sub-folder first, so same-named fields of two slides stay apart
            img = _find_image(images / x.parent.relative_to(ann_dir), stem, filename) \
                or image_index.get(filename or "") or image_index.get(stem)
        else:
            rel_parent = x.parent.relative_to(ann_dir)
            img = (_find_image(default_images / rel_parent, stem, filename) if default_images.is_dir() else None) \
                or _find_image(x.parent, stem, filename)
        w = int(float(root.findtext("size/width") or 0))
        h = int(float(root.findtext("size/height") or 0))
        rel = x.relative_to(ann_dir).with_suffix("")
        ai = AnnotatedImage(image_id=str(rel), image_path=img or Path(filename or stem), width=w, height=h)
        for obj in root.findall("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            try:
                coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                continue
            score_text = obj.findtext("score")
            ai.boxes.append(Box(_canonical_label(obj.findtext("name") or ""), *coords,
                                score=float(score_text) if score_text else None))
        out.append(ai)
    sets = source / "ImageSets" / "Main"
    if sets.is_dir():
        by_id = {a.image_id: a for a in out}
        for split in SPLITS:
            f = sets / f"{split}.txt"
            if f.is_file():
                for line in f.read_text().split():
                    if line in by_id:
                        by_id[line].split = split
    return out


def yolo_lines(boxes: Sequence[Sequence[float]], classes: Sequence[int], size: tuple[float, float],
               scores: Sequence[float] | None = None) -> list[str]:
    """Pixel xyxy boxes as YOLO label lines: class, centre and size as fractions of the image (6 decimals),
    and a score column (4 decimals) where ``scores`` are given. The one writer of YOLO labels.

    Example:
        >>> yolo_lines([(0, 0, 64, 48)], [2], (640, 480), scores=[0.5])
        ['2 0.050000 0.050000 0.100000 0.100000 0.5000']
    """
    w, h = size
    out = []
    for k, (b, c) in enumerate(zip(boxes, classes)):
        line = (f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                f"{(b[3] - b[1]) / h:.6f}")
        out.append(line if scores is None else f"{line} {float(scores[k]):.4f}")
    return out


def parse_yolo_line(line: str, size: tuple[float, float]) -> tuple[int, tuple[float, float, float, float],
                                                                   float | None] | None:
    """One YOLO label line as (class, pixel xyxy box, score or None); None for a line without a box.
    The one reader of YOLO labels.

    Example:
        >>> parse_yolo_line("2 0.05 0.05 0.1 0.1 0.5", (640, 480))
        (2, (0.0, 0.0, 64.0, 48.0), 0.5)
    """
    parts = line.split()
    if len(parts) < 5:
        return None
    w, h = size
    c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
    return c, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h), \
        (float(parts[5]) if len(parts) > 5 else None)


def read_yolo(data_yaml: Path) -> list[AnnotatedImage]:
    """Read a YOLO dataset from its ``data.yaml`` (``path``, ``train``/``val``/``test``, ``names``)."""
    import cv2
    import yaml

    cfg = yaml.safe_load(data_yaml.read_text())
    names = cfg.get("names", {})
    if isinstance(names, list):
        names = dict(enumerate(names))
    root = Path(cfg.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    out = []
    for split in SPLITS:
        if not cfg.get(split):
            continue
        img_dir = root / cfg[split]
        for img in sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = img.relative_to(img_dir)
            lbl = root / Path(str(cfg[split]).replace("images", "labels", 1)) / rel.with_suffix(".txt")
            im = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
            h, w = (im.shape[:2] if im is not None else (0, 0))
            ai = AnnotatedImage(str(rel.with_suffix("")), img, w, h, split=split)
            if lbl.is_file():
                _add_yolo_boxes(ai, lbl.read_text(), names)
            out.append(ai)
    return out


def read_yolo_folder(source: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Read a plain folder of YOLO ``.txt`` files plus ``classes.txt`` (LabelImg's YOLO layout, ``smear annotate``).

    Each ``sub/name.txt`` belongs to the image ``sub/name.*`` under ``images`` (default: next to the txt).
    """
    import cv2

    names = dict(enumerate(n.strip() for n in (source / "classes.txt").read_text().splitlines() if n.strip()))
    out = []
    for txt in sorted(t for t in source.rglob("*.txt") if t != source / "classes.txt"):
        rel = txt.relative_to(source).with_suffix("")
        img = _find_image((images or source) / rel.parent, rel.name, None)
        im = cv2.imread(str(img), cv2.IMREAD_UNCHANGED) if img is not None else None
        h, w = (im.shape[:2] if im is not None else (0, 0))
        ai = AnnotatedImage(rel.as_posix(), img or (images or source) / rel.parent / f"{rel.name}.jpg", w, h)
        if w:
            _add_yolo_boxes(ai, txt.read_text(), names)
        out.append(ai)
    return out


def _add_yolo_boxes(ai: AnnotatedImage, text: str, names: dict) -> None:
    for line in text.splitlines():
        parsed = parse_yolo_line(line, (ai.width, ai.height))
        if parsed is not None:
            c, (x1, y1, x2, y2), score = parsed
            ai.boxes.append(Box(_canonical_label(names.get(c, str(c))), x1, y1, x2, y2, score=score))


def read_coco(path: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Read a COCO detection JSON; images are looked up under ``images`` or next to the JSON."""
    d = json.loads(path.read_text())
    cats = {c["id"]: _canonical_label(c["name"]) for c in d.get("categories", [])}
    base = images or path.parent
    out: dict[int, AnnotatedImage] = {}
    for im in d.get("images", []):
        fn = im["file_name"]
        out[im["id"]] = AnnotatedImage(str(Path(fn).with_suffix("")), base / fn, int(im.get("width", 0)),
                                       int(im.get("height", 0)), split=im.get("split"))
    for a in d.get("annotations", []):
        x, y, w, h = a["bbox"]
        if a["image_id"] in out:
            out[a["image_id"]].boxes.append(Box(cats.get(a["category_id"], str(a["category_id"])), x, y, x + w, y + h,
                                                score=a.get("score")))
    return list(out.values())


def read_source(source: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Read any supported labelled source: VOC folder, YOLO ``data.yaml``, COCO ``.json``, or a YOLO txt folder
    with ``classes.txt``."""
    source = Path(source)
    if not source.exists():
        raise SmearError(f"{source}: source not found (expected a VOC folder, a YOLO data.yaml or a COCO .json)")
    if source.is_file() and source.suffix in (".yaml", ".yml"):
        return read_yolo(source)
    if source.is_file() and source.suffix == ".json":
        return read_coco(source, images)
    if source.is_dir() and (source / "data.yaml").is_file() and not any(source.rglob("*.xml")):
        return read_yolo(source / "data.yaml")
    if source.is_dir() and (source / "classes.txt").is_file() and not any(source.rglob("*.xml")):
        return read_yolo_folder(source, images)
    return read_voc(source, images)


def read_subtypes(csv_path: Path) -> dict[str, list[str]]:
    """BCCD's ``wbc_subtypes.csv``: image id (``BloodImage_%05d``) -> list of subtype labels."""
    out: dict[str, list[str]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            num = (row.get("Image") or "").strip()
            if not num.isdigit():
                continue
            cats = [c.strip().capitalize() for c in re.split(r"[,;]", row.get("Category") or "") if c.strip()]
            out[f"BloodImage_{int(num):05d}"] = [c for c in cats if c in SUBTYPES]
    return out


# ---------------------------------------------------------------- audit

def _fmt_box(b: Box) -> str:
    return f"{b.x1:g},{b.y1:g},{b.x2:g},{b.y2:g}"


def audit_image(ai: AnnotatedImage, cfg: DataConfig) -> list[AuditRow]:
    """Clip, drop and deduplicate the boxes of one image in place; return what was done and why."""
    rows: list[AuditRow] = []
    kept: list[Box] = []
    for b in ai.boxes:
        if b.label not in GROUPS and b.label not in CELL_CLASSES:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", f"unknown class '{b.label}'"))
            continue
        if b.x2 <= b.x1 or b.y2 <= b.y1:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", "degenerate box (max <= min)"))
            continue
        if ai.width and ai.height:
            c = Box(b.label, max(0.0, b.x1), max(0.0, b.y1), min(float(ai.width), b.x2), min(float(ai.height), b.y2), b.score)
            if c.xyxy != b.xyxy:
                if c.x2 - c.x1 < cfg.min_box_px or c.y2 - c.y1 < cfg.min_box_px:
                    rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", "outside the image"))
                    continue
                rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "clipped",
                                     f"crossed the image border; now {_fmt_box(c)}"))
                b = c
        if b.x2 - b.x1 < cfg.min_box_px or b.y2 - b.y1 < cfg.min_box_px:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped", f"smaller than {cfg.min_box_px:g} px"))
            continue
        dup = next((k for k in kept if group_of(k.label) == group_of(b.label) and box_iou(k.xyxy, b.xyxy) > cfg.duplicate_iou), None)
        if dup is not None:
            rows.append(AuditRow(ai.image_id, b.label, _fmt_box(b), "dropped",
                                 f"near-duplicate of {_fmt_box(dup)} "
                                 f"(IoU {box_iou(dup.xyxy, b.xyxy):.2f} > {cfg.duplicate_iou:g})"))
            continue
        kept.append(b)
    ai.boxes = kept
    if not any(group_of(b.label) == "WBC" for b in kept):
        rows.append(AuditRow(ai.image_id, "", "", "note", "image has no WBC box (kept)"))
    return rows


def assign_subtypes(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> AuditRow | None:
    """Give WBC boxes their subtype where the assignment is unambiguous.

    One WBC box and one label: that label. Several WBC boxes whose labels are all the same
    subtype, one label per box: every box gets it. Anything else keeps plain ``WBC`` (kept for
    detection and group classification, excluded from subtype training) with a note.
    """
    wbcs = [b for b in ai.boxes if group_of(b.label) == "WBC"]
    if not wbcs or ai.image_id not in subtypes or any(b.label != "WBC" for b in wbcs):
        return None  # nothing to assign, or a person already named the subtypes
    labels = subtypes[ai.image_id]
    if len(wbcs) == len(labels) and len(set(labels)) == 1:
        for b in wbcs:
            b.label = labels[0]
        return None
    for b in wbcs:
        b.label = "WBC"
    # Reason kind first (before the colon), so the summary groups these notes into one line.
    return AuditRow(ai.image_id, "WBC", "", "note",
                    f"subtype not assignable: {len(wbcs)} WBC box(es) vs labels {labels or 'none'}; kept as WBC")


def missing_wbc_box(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> AuditRow | None:
    """A WBC the subtype table names in an image that has no WBC box: the box is missing, not the cell.

    BCCD's subtype table and its boxes were made separately; where the table names a WBC and no
    box holds one, the field does show a WBC (checked by eye on all six such BCCD images), so a
    detector that finds it is right, not a false positive.
    """
    named = subtypes.get(ai.image_id)
    if not named or any(group_of(b.label) == "WBC" for b in ai.boxes):
        return None
    big, typical = wbc_boxed_as_platelets(ai)
    hint = "".join(f"; its Platelets box {_fmt_box(b)} is larger than its median RBC "
                   f"({typical:g} px): likely that WBC under the wrong class" for b in big)
    scored = ("the audited evaluation scores that box as the WBC" if big else
              "the audited evaluation ignores WBC detections in this image")
    return AuditRow(ai.image_id, "WBC", "", "note", f"WBC box missing: the subtype table names {', '.join(named)}{hint}; {scored}")


def relabel_wbc_boxed_as_platelets(ai: AnnotatedImage, subtypes: dict[str, list[str]]) -> list[AuditRow]:
    """Name the WBC that :func:`wbc_boxed_as_platelets` finds as a WBC (its subtype where the table makes that
    unambiguous), for training data: the detector and the classifier then learn it as what it is."""
    big, typical = wbc_boxed_as_platelets(ai)
    for b in big:
        b.label = "WBC"
    note = assign_subtypes(ai, subtypes)
    return [AuditRow(ai.image_id, "Platelets", _fmt_box(b), "relabelled",
                     f"WBC boxed as Platelets: the subtype table names {', '.join(subtypes.get(ai.image_id, []))}, the "
                     f"image has no WBC box and this box is larger than its median RBC ({typical:g} px); now {b.label}")
            for b in big] + ([note] if note else [])


def wbc_boxed_as_platelets(ai: AnnotatedImage) -> tuple[list[Box], float]:
    """The image's "Platelets" boxes larger than its median RBC (:func:`oversized_platelets`), and that median.
    Meant for images whose WBC has no box (:func:`missing_wbc_box`)."""
    mask, typical = oversized_platelets([group_of(b.label) for b in ai.boxes],
                                        [max(b.x2 - b.x1, b.y2 - b.y1) for b in ai.boxes])
    return [b for b, m in zip(ai.boxes, mask) if m], typical


def oversized_platelets(groups: Sequence[str], sides: Sequence[float]) -> tuple[np.ndarray, float]:
    """Which of an image's boxes are "Platelets" boxes larger than its median RBC box (longest sides, any
    one unit), and that median. In an image whose WBC has no box, such a box is that WBC under the wrong
    class (BCCD 00133 and 00135, checked by eye); a platelet is a fraction of an RBC's size.

    Example:
        >>> oversized_platelets(["RBC", "RBC", "RBC", "Platelets", "Platelets"], [100, 110, 120, 25, 140])
        (array([False, False, False, False,  True]), 110.0)
    """
    groups, sides = np.asarray(groups), np.asarray(sides, dtype=float)
    rbc = sides[groups == "RBC"]
    typical = float(np.median(rbc)) if rbc.size else 0.0
    return (groups == "Platelets") & (sides > typical) & (typical > 0), typical


def assign_splits(images: list[AnnotatedImage], cfg: DataConfig) -> None:
    """Deterministic image-level split for images without one (hash of id and seed)."""
    for ai in images:
        if ai.split in SPLITS:
            continue
        h = int(hashlib.sha256(f"{cfg.split_seed}:{ai.image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        ai.split = "test" if h < cfg.test_fraction else "val" if h < cfg.test_fraction + cfg.val_fraction else "train"


# ---------------------------------------------------------------- crops

def crop_cell(image: np.ndarray, box: Iterable[float], margin: float, size: int) -> np.ndarray:
    """Square crop centred on ``box``, side = longest box side x (1 + 2 margin), resized to ``size``.

    Parts outside the image are filled by border replication, so cells on the edge keep
    their place in the crop. The same function serves training and inference.
    """
    import cv2

    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * margin)
    h, w = image.shape[:2]
    # Affine warp does crop, border fill and resize in one pass.
    scale = size / side
    m = np.array([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]], dtype=np.float32)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------- prepare

@dataclass
class PrepareSummary:
    images: int
    images_per_split: dict[str, int]
    boxes_per_class: dict[str, int]
    crops_per_label: dict[str, int]
    audit_counts: dict[str, int]
    failed_images: list[str]
    out: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _reason_kind(reason: str) -> str:
    """The reason without its per-box details, for the summary table."""
    for sep in (" (", ";", ":", " of "):
        reason = reason.split(sep)[0]
    return reason


def _safe_name(image_id: str) -> str:
    return image_id.replace("/", "__").replace("\\", "__")


def prepare_dataset(sources: list[Path], out: Path, cfg: DataConfig, images: Path | None = None,
                    subtypes_csv: Path | None = None) -> PrepareSummary:
    """Audit one or more labelled sources and write the YOLO set, the crop set and the audit."""
    import cv2
    import yaml

    all_images: list[AnnotatedImage] = []
    for i, src in enumerate(sources):
        items = read_source(Path(src), images)
        if len(sources) > 1:  # keep ids unique when merging several sources
            for ai in items:
                ai.image_id = f"src{i}/{ai.image_id}"
        all_images.extend(items)
    subtypes = read_subtypes(subtypes_csv) if subtypes_csv and Path(subtypes_csv).is_file() else {}
    assign_splits(all_images, cfg)

    out = Path(out)
    audit: list[AuditRow] = []
    failed: list[str] = []
    manifest: list[dict] = []
    incomplete: list[list[str]] = []
    box_counts: Counter = Counter()
    crop_counts: Counter = Counter()
    split_counts: Counter = Counter()
    yolo = out / "yolo"
    crops = out / "crops"
    for split in SPLITS:
        (yolo / "images" / split).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
    crops.mkdir(parents=True, exist_ok=True)

    for ai in all_images:
        img = cv2.imread(str(ai.image_path), cv2.IMREAD_COLOR) if Path(ai.image_path).is_file() else None
        if img is None:
            reason = "image file not found" if not Path(ai.image_path).is_file() else "image cannot be decoded"
            audit.append(AuditRow(ai.image_id, "", "", "image skipped", f"{reason}: {ai.image_path}"))
            failed.append(f"{ai.image_path}: {reason}")
            continue
        h, w = img.shape[:2]
        if (ai.width, ai.height) != (w, h):
            if ai.width or ai.height:
                audit.append(AuditRow(ai.image_id, "", "", "note",
                                      f"annotation size {ai.width}x{ai.height} differs from image {w}x{h}; image size used"))
            ai.width, ai.height = w, h
        audit.extend(audit_image(ai, cfg))
        note = assign_subtypes(ai, subtypes) if subtypes else None
        if note:
            audit.append(note)
        name = _safe_name(ai.image_id)
        missing = missing_wbc_box(ai, subtypes)
        if missing and ai.split == "train" and cfg.relabel_train_wbc and wbc_boxed_as_platelets(ai)[0]:
            audit.extend(relabel_wbc_boxed_as_platelets(ai, subtypes))
        elif missing:
            audit.append(missing)
            incomplete.append([name, ai.split, "WBC", missing.reason])
        split_counts[ai.split] += 1
        suffix = Path(ai.image_path).suffix.lower() or ".jpg"
        shutil.copyfile(ai.image_path, yolo / "images" / ai.split / f"{name}{suffix}")
        lines = yolo_lines([b.xyxy for b in ai.boxes], [GROUPS.index(group_of(b.label)) for b in ai.boxes], (w, h))
        for j, b in enumerate(ai.boxes):
            g = group_of(b.label)
            box_counts[g] += 1
            crop_rel = Path(ai.split) / b.label / f"{name}_{j:03d}.png"
            (crops / crop_rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(crops / crop_rel), crop_cell(img, b.xyxy, cfg.crop_margin, cfg.crop_size_px))
            crop_counts[b.label] += 1
            manifest.append({
                "crop_path": str(crop_rel), "source_image": str(Path(ai.image_path).resolve()), "image_id": ai.image_id,
                "x1": round(b.x1, 2), "y1": round(b.y1, 2), "x2": round(b.x2, 2), "y2": round(b.y2, 2),
                "label": b.label, "group": g, "split": ai.split,
            })
        (yolo / "labels" / ai.split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))

    (yolo / "data.yaml").write_text(yaml.safe_dump({
        "path": str(yolo.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
        "names": dict(enumerate(GROUPS)),
    }, sort_keys=False))
    with open(yolo / INCOMPLETE_LABELS, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "split", "class", "reason"])
        wr.writerows(incomplete)
    fields = ["crop_path", "source_image", "image_id", "x1", "y1", "x2", "y2", "label", "group", "split"]
    with open(crops / "manifest.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(manifest)
    with open(out / "audit.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image_id", "label", "box", "action", "reason"])
        wr.writerows([dataclasses.astuple(r) for r in audit])
    audit_counts = Counter(f"{r.action}: {_reason_kind(r.reason)}" for r in audit)
    summary = PrepareSummary(
        images=sum(split_counts.values()), images_per_split={s: split_counts.get(s, 0) for s in SPLITS},
        boxes_per_class={g: box_counts.get(g, 0) for g in GROUPS},
        crops_per_label={c: crop_counts.get(c, 0) for c in CELL_CLASSES + ("WBC",)},
        audit_counts=dict(sorted(audit_counts.items())), failed_images=failed, out=str(out),
    )
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary
