"""'smear data prepare': audit labelled sources, then write the YOLO set, the crop set and the audit.

1. ``yolo/``: a YOLO detection dataset (images, labels, ``data.yaml``), official split kept;
2. ``crops/``: one crop per box for the classifier plus ``manifest.csv``;
3. ``audit.csv``: every box fixed or dropped, and image-level notes, with the reason;
4. ``yolo/incomplete_labels.csv``: images known to lack a box of some class (a WBC the subtype table
   names but no WBC box holds), so evaluation can report metrics that ignore that class there.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from smear.configs.errors import ImageReadError

from .audit import (
    INCOMPLETE_LABELS,
    AuditRow,
    assign_subtypes,
    audit_image,
    missing_wbc_box,
    relabel_wbc_boxed_as_platelets,
    wbc_boxed_as_platelets,
)
from .config import DataConfig
from .crops import crop_cell
from .formats import SPLITS, AnnotatedImage, read_source, read_subtypes, yolo_lines
from .images import read_bgr
from .splits import assign_splits
from .taxonomy import CELL_CLASSES, GROUPS, group_of

log = logging.getLogger(__name__)


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
    source_of: dict[str, str] = {}  # image id -> the source folder's name (the lab, for leave-one-lab-out)
    for i, src in enumerate(sources):
        items = read_source(Path(src), images)
        if len(sources) > 1:  # keep ids unique when merging several sources
            for ai in items:
                ai.image_id = f"src{i}/{ai.image_id}"
        source_of.update({ai.image_id: Path(src).resolve().name.lower() for ai in items})
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
        try:
            img = read_bgr(ai.image_path) if Path(ai.image_path).is_file() else None
        except ImageReadError:
            img = None
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
                "label": b.label, "group": g, "split": ai.split, "source": source_of.get(ai.image_id, ""),
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
    fields = ["crop_path", "source_image", "image_id", "x1", "y1", "x2", "y2", "label", "group", "split", "source"]
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
