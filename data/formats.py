"""Read and write labelled fields: VOC, YOLO, COCO, and BCCD's WBC subtype table."""

from __future__ import annotations

import csv
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from smear.configs.errors import SmearError

from .images import IMAGE_SUFFIXES, image_size
from .taxonomy import SUBTYPES, _canonical_label

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


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
            w, h = image_size(img) or (0, 0)
            ai = AnnotatedImage(str(rel.with_suffix("")), img, w, h, split=split)
            if lbl.is_file():
                _add_yolo_boxes(ai, lbl.read_text(), names)
            out.append(ai)
    return out


def read_yolo_folder(source: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Read a plain folder of YOLO ``.txt`` files plus ``classes.txt`` (LabelImg's YOLO layout, ``smear annotate``).

    Each ``sub/name.txt`` belongs to the image ``sub/name.*`` under ``images`` (default: next to the txt).
    """

    names = dict(enumerate(n.strip() for n in (source / "classes.txt").read_text().splitlines() if n.strip()))
    out = []
    for txt in sorted(t for t in source.rglob("*.txt") if t != source / "classes.txt"):
        rel = txt.relative_to(source).with_suffix("")
        img = _find_image((images or source) / rel.parent, rel.name, None)
        w, h = (image_size(img) if img is not None else None) or (0, 0)
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
