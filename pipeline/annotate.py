"""Batch pre-annotation of new slides (``smear annotate``): boxes to review in LabelImg or CVAT.

One run walks a folder of images, runs the pipeline and writes one annotation per image
(Pascal VOC XML or YOLO txt, mirroring the folder structure) or one COCO JSON for the run.
Every file written is recorded in ``annotate_manifest.csv`` with the SHA-256 of its bytes,
which is what makes re-runs safe:

- an annotation whose bytes match a version smear wrote is smear's: skipped on a re-run,
  replaced with ``overwrite``;
- any other annotation (edited by a person, or never recorded) is a person's: never replaced,
  unless ``overwrite`` and ``force`` are both given.

The manifest is an append-only history (one row per file version written), so an older
version of smear's own output still counts as smear's. It is written before the annotation
files, so a run killed in between leaves only records of files that are missing or still
smear's, and the next run re-annotates those images.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from smear.configs.errors import SmearError
from smear.data.formats import yolo_lines
from smear.data.images import IMAGE_SUFFIXES, expand_inputs
from smear.data.taxonomy import GROUPS, NRBC, SUBTYPES

from .config import PipelineConfig
from .progress import progress_bar
from .report import atomic_write_text
from .results import ImageResult

log = logging.getLogger(__name__)

FORMATS = ("voc", "yolo", "coco")
# "WBC" closes the subtype list: a WBC the classifier gave no subtype (only with a classifier
# trained without subtypes); reviewers may also use it for "WBC, subtype unsure".
LABEL_SETS: dict[str, tuple[str, ...]] = {"groups": GROUPS, "subtypes": ("RBC", "Platelets", *SUBTYPES, NRBC, "WBC")}
MANIFEST_NAME = "annotate_manifest.csv"
COCO_NAME = "annotations.json"
YOLO_CLASSES_NAME = "classes.txt"
MANIFEST_FIELDS = ("image", "annotation", "sha256", "format", "labels", "conf", "n_cells", "detector",
                   "detector_commit", "classifier", "classifier_commit", "time")
FLUSH_INTERVAL_S = 10.0  # how often finished work is written out; a killed run loses at most this much


def default_config() -> PipelineConfig:
    """The pipeline config ``annotate_folder`` uses when given neither ``analyzer`` nor ``cfg``."""
    return PipelineConfig()


@dataclass
class AnnotateSummary:
    """What one ``annotate_folder`` run did; ``failed`` holds one ``"path: problem"`` line per bad image."""

    output: Path
    format: str
    labels: str
    annotated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cells_per_class: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d

    def text(self) -> str:
        """A short human summary: counts, cells per class, then protected and failed files by name."""
        total = len(self.annotated) + len(self.skipped) + len(self.protected) + len(self.failed)
        lines = [f"{total} image(s): {len(self.annotated)} annotated, {len(self.skipped)} skipped (done before), "
                 f"{len(self.protected)} protected (edited by a person), {len(self.failed)} failed"]
        cells = ", ".join(f"{k} {v}" for k, v in self.cells_per_class.items()) or "none"
        lines.append(f"cells written per class: {cells}")
        if self.protected:
            lines.append("protected, kept as they are (--overwrite --force replaces them):")
            lines.extend(f"  {p}" for p in self.protected)
        if self.failed:
            lines.append("failed (skipped; the rest of the batch went on):")
            lines.extend(f"  {f}" for f in self.failed)
        where = self.output / COCO_NAME if self.format == "coco" else self.output
        lines.append(f"{self.format.upper()} annotations in {where} (manifest: {self.output / MANIFEST_NAME})")
        return "\n".join(lines)


# ---------------------------------------------------------------- format writers

def _label_of(cell, labels: str) -> str:
    if labels == "groups":
        return cell.group
    if cell.group == "WBC":
        return cell.label if cell.label in SUBTYPES or cell.label == NRBC else "WBC"
    return cell.group


def _clipped_box(cell, width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in cell.box)
    return max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)


def voc_xml(image_path: Path, result: ImageResult, cells: Sequence, labels: str) -> str:
    """Pascal VOC XML laid out like BCCD's, plus a ``<score>`` per object (LabelImg and CVAT ignore it)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = image_path.parent.name
    ET.SubElement(root, "filename").text = image_path.name
    ET.SubElement(root, "path").text = str(image_path.resolve())
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "smear annotate"
    size = ET.SubElement(root, "size")
    for k, v in (("width", result.width), ("height", result.height), ("depth", 3)):
        ET.SubElement(size, k).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for cell in cells:
        x1, y1, x2, y2 = _clipped_box(cell, result.width, result.height)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = _label_of(cell, labels)
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        xmin, ymin = int(round(x1)), int(round(y1))
        xmax, ymax = max(int(round(x2)), xmin + 1), max(int(round(y2)), ymin + 1)
        for k, v in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(bb, k).text = str(v)
        ET.SubElement(obj, "score").text = f"{float(cell.score):.4f}"
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def yolo_txt(result: ImageResult, cells: Sequence, labels: str) -> str:
    """YOLO lines ``class cx cy w h score`` (normalised; the score column is dropped by ``smear data prepare``)."""
    names = LABEL_SETS[labels]
    lines = yolo_lines([_clipped_box(c, result.width, result.height) for c in cells],
                       [names.index(_label_of(c, labels)) for c in cells],
                       (float(result.width), float(result.height)), scores=[c.score for c in cells])
    return "".join(line + "\n" for line in lines)


def coco_categories(labels: str) -> list[dict[str, Any]]:
    from smear.data.taxonomy import group_of

    return [{"id": i + 1, "name": n, "supercategory": group_of(n)} for i, n in enumerate(LABEL_SETS[labels])]


def empty_coco(labels: str) -> dict[str, Any]:
    return {"info": {"description": "smear annotate pre-annotations (to be reviewed)", "version": "1.0"},
            "licenses": [], "images": [], "annotations": [], "categories": coco_categories(labels)}


def add_coco_image(doc: dict[str, Any], file_name: str, result: ImageResult, cells: Sequence, labels: str) -> None:
    """Add (or replace) one image and its boxes in a COCO document; ids continue from the largest in use."""
    old = [im["id"] for im in doc["images"] if im["file_name"] == file_name]
    if old:
        doc["images"] = [im for im in doc["images"] if im["id"] not in old]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in old]
    image_id = max((im["id"] for im in doc["images"]), default=0) + 1
    next_ann = max((a["id"] for a in doc["annotations"]), default=0) + 1
    doc["images"].append({"id": image_id, "file_name": file_name, "width": result.width, "height": result.height})
    cat_ids = {c["name"]: c["id"] for c in doc["categories"]}
    for cell in cells:
        x1, y1, x2, y2 = _clipped_box(cell, result.width, result.height)
        w, h = round(x2 - x1, 1), round(y2 - y1, 1)
        category_id = cat_ids[_label_of(cell, labels)]
        doc["annotations"].append({"id": next_ann, "image_id": image_id, "category_id": category_id,
                                   "bbox": [round(x1, 1), round(y1, 1), w, h], "area": round(w * h, 1),
                                   "iscrowd": 0, "segmentation": [], "score": round(float(cell.score), 4)})
        next_ann += 1


def coco_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"


# ---------------------------------------------------------------- manifest

def sha256_of(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def manifest_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    return buf.getvalue()


def _model_versions(analyzer) -> dict[str, str]:
    try:
        info = analyzer.info()
    except Exception as e:  # noqa: BLE001  versions are a record, never a reason to stop
        log.debug("analyzer.info() failed: %s", e)
        info = {}
    det, cls = info.get("detector") or {}, info.get("classifier") or {}
    return {"detector": str(det.get("weights") or ""), "detector_commit": str(det.get("commit") or ""),
            "classifier": str(cls.get("weights") or ""), "classifier_commit": str(cls.get("commit") or "")}


# ---------------------------------------------------------------- the run

def _analyze(analyzer, paths: list[Path]) -> list[ImageResult]:
    """Analyse a chunk; if the chunk raises, retry image by image so one bad file never stops the batch."""
    try:
        return list(analyzer.analyze_images(paths))
    except Exception as e:  # noqa: BLE001
        if len(paths) == 1:
            return [ImageResult(image=str(paths[0]), error=f"{paths[0]}: {type(e).__name__}: {e}")]
        return [r for p in paths for r in _analyze(analyzer, [p])]


def _check_options(directory: Path, format: str, labels: str, conf: float, overwrite: bool, force: bool) -> None:
    if format not in FORMATS:
        raise SmearError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if labels not in LABEL_SETS:
        raise SmearError(f"--labels {labels!r}: expected groups (RBC/WBC/Platelets) or subtypes (WBC subtypes)")
    if not 0.0 <= conf <= 1.0:
        raise SmearError(f"--conf {conf}: expected a score between 0 and 1 (e.g. 0.25)")
    if force and not overwrite:
        raise SmearError("--force only applies together with --overwrite (replace files a person edited too)")
    if not directory.is_dir():
        raise SmearError(f"{directory}: not a folder of images (smear annotate walks a folder recursively)")


def annotate_folder(directory: Path, output: Path | None = None, format: str = "voc", labels: str = "groups",
                    conf: float = 0.25, overwrite: bool = False, force: bool = False, analyzer=None,
                    progress: bool = True, cfg: PipelineConfig | None = None) -> AnnotateSummary:
    """Pre-annotate every image under ``directory`` for review; resumable and safe to re-run.

    Args:
        directory: folder of images, walked recursively.
        output: annotation folder (default ``directory/annotations``), mirroring the folder structure.
        format: ``voc`` (one XML per image), ``yolo`` (one txt per image plus ``classes.txt``) or
            ``coco`` (one ``annotations.json`` for the run).
        labels: ``groups`` (RBC, WBC, Platelets) or ``subtypes`` (RBC, Platelets, the WBC subtypes).
        conf: minimum detector score kept.
        overwrite: re-annotate images smear annotated before.
        force: with ``overwrite``, also replace annotations a person edited or wrote.
        analyzer: an object with ``analyze_images(paths)`` (and ``info()``); default: an
            :class:`~smear.pipeline.analyze.Analyzer` built from ``cfg`` (or :func:`default_config`)
            with ``conf``, loaded only when there is something to annotate.
        progress: show a progress bar (images/s, ETA) when stderr is a terminal.
        cfg: pipeline config for the default analyzer.

    Example:
        >>> summary = annotate_folder(Path("new_slides"), format="voc", labels="subtypes")
        >>> print(summary.text())
    """
    directory = Path(directory)
    _check_options(directory, format, labels, conf, overwrite, force)
    out = Path(output) if output is not None else directory / "annotations"
    out_resolved = out.resolve()
    images = [p for p in expand_inputs([directory])  # an empty folder comes back as itself: not an image
              if p.is_file() and out_resolved not in p.resolve().parents]  # never annotate the output folder
    if not images:
        raise SmearError(f"{directory}: no images found (looked recursively for {', '.join(IMAGE_SUFFIXES)})")

    summary = AnnotateSummary(output=out, format=format, labels=labels)
    manifest_path = out / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    written_hashes: dict[str, set[str]] = {}
    for row in manifest:
        written_hashes.setdefault(row.get("annotation", ""), set()).add(row.get("sha256", ""))

    def is_smears(annotation_rel: str, data: bytes) -> bool:
        return sha256_of(data) in written_hashes.get(annotation_rel, set())

    rel_of = {p: p.relative_to(directory).as_posix() for p in images}
    todo: list[Path] = []
    annotation_of: dict[Path, str] = {}
    coco_doc: dict[str, Any] | None = None
    coco_before = b""

    if format == "coco":
        coco_path = out / COCO_NAME
        if coco_path.is_file():
            coco_before = coco_path.read_bytes()
            if not is_smears(COCO_NAME, coco_before) and not (overwrite and force):
                summary.protected = [str(p) for p in images]
                log.warning("%s was edited by a person (or not written by smear): kept as it is; "
                            "--overwrite --force replaces it, or choose another --output", coco_path)
                return summary
            if not overwrite:
                coco_doc = json.loads(coco_before)
                if [c["name"] for c in coco_doc.get("categories", [])] != list(LABEL_SETS[labels]):
                    raise SmearError(f"{coco_path}: written with other labels "
                                     f"({', '.join(c['name'] for c in coco_doc.get('categories', []))}); run with the "
                                     f"same --labels, add --overwrite, or choose another --output")
        if coco_doc is None:
            coco_doc = empty_coco(labels)
        done = {im["file_name"] for im in coco_doc["images"]}
        for p in images:
            annotation_of[p] = COCO_NAME
            if rel_of[p] in done:
                summary.skipped.append(str(p))
            else:
                todo.append(p)
    else:
        suffix = ".xml" if format == "voc" else ".txt"
        if format == "yolo":
            classes_path = out / YOLO_CLASSES_NAME
            wanted = "".join(n + "\n" for n in LABEL_SETS[labels])
            if classes_path.is_file() and classes_path.read_text() != wanted:
                raise SmearError(f"{classes_path}: lists other classes ({', '.join(classes_path.read_text().split())});"
                                 f" this run would write {', '.join(LABEL_SETS[labels])}. Run with the same --labels "
                                 f"or choose another --output")
        owner: dict[str, Path] = {}
        for p in images:
            ann = Path(rel_of[p]).with_suffix(suffix).as_posix()
            if ann in owner:  # a.jpg and a.png in one folder would share a.xml
                summary.failed.append(f"{p}: same annotation name {ann} as {owner[ann]}; rename one of them")
                continue
            owner[ann] = p
            annotation_of[p] = ann
            target = out / ann
            if not target.is_file():
                todo.append(p)
            elif not is_smears(ann, target.read_bytes()):  # a person's file
                if overwrite and force:
                    todo.append(p)
                else:
                    summary.protected.append(str(p))
            elif overwrite:
                todo.append(p)
            else:
                summary.skipped.append(str(p))
    for line in summary.failed:
        log.warning("%s", line)

    cells_per_class: Counter = Counter({n: 0 for n in LABEL_SETS[labels]})
    if todo:
        if analyzer is None:
            from .analyze import Analyzer

            # --conf is one threshold for every class: pre-labels for a person to correct, not counts
            analyzer = Analyzer((cfg or default_config()).one_threshold(conf))
        versions = _model_versions(analyzer)
        batch = int(getattr(getattr(analyzer, "cfg", None), "batch", 8) or 8)
        pending_rows: list[dict[str, Any]] = []
        pending_files: list[tuple[Path, str]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush, coco_before
            if format == "coco" and pending_rows:
                text = coco_text(coco_doc)
                for row in pending_rows:
                    row["sha256"] = sha256_of(text)
                if text.encode() != coco_before:
                    pending_files.append((out / COCO_NAME, text))
                    coco_before = text.encode()
            if format == "yolo" and not (out / YOLO_CLASSES_NAME).is_file():
                pending_files.append((out / YOLO_CLASSES_NAME, "".join(n + "\n" for n in LABEL_SETS[labels])))
            if pending_rows:
                manifest.extend(pending_rows)
                atomic_write_text(manifest_path, manifest_text(manifest))  # the record first, then the files
            for path, text in pending_files:
                atomic_write_text(path, text)
            pending_rows.clear()
            pending_files.clear()
            last_flush = time.monotonic()

        bar = progress_bar(len(todo), "annotate", progress and sys.stderr.isatty())
        try:
            for start in range(0, len(todo), batch):
                chunk = todo[start:start + batch]
                for p, result in zip(chunk, _analyze(analyzer, chunk)):
                    if result.error or not result.width or not result.height:
                        err = result.error or "no image size"
                        line = err if err.startswith(str(p)) else f"{p}: {err}"
                        summary.failed.append(line)
                        log.warning("%s", line)
                        continue
                    cells = [c for c in result.cells if float((c.detector or {}).get("score", c.score)) >= conf]
                    ann = annotation_of[p]
                    if format == "coco":
                        add_coco_image(coco_doc, rel_of[p], result, cells, labels)
                        text = ""
                    else:
                        text = voc_xml(p, result, cells, labels) if format == "voc" else yolo_txt(result, cells, labels)
                        pending_files.append((out / ann, text))
                    pending_rows.append({"image": rel_of[p], "annotation": ann, "sha256": sha256_of(text),
                                         "format": format, "labels": labels, "conf": conf, "n_cells": len(cells),
                                         **versions, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                    cells_per_class.update(_label_of(c, labels) for c in cells)
                    summary.annotated.append(str(p))
                if bar is not None:
                    bar.update(len(chunk))
                if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                    flush()
        finally:  # also on Ctrl-C: what is finished is kept and recorded
            flush()
            if bar is not None:
                bar.close()
    summary.cells_per_class = dict(cells_per_class)
    return summary
