"""``smear review OUT --export DIR``: the reviewed cells as training data, no server.

- ``DIR/<class>/<slide>_<cell id>.png``: a crop of every cell a person checked (corrected or accepted, or every cell
  of a signed-off slide) under its final label, cut as ``smear classify`` reads a cell image (the cell with a
  margin): the input of ``smear classifier adapt``.
- ``DIR/voc/<field>.xml`` and the field image beside it: every field of a signed-off or in-review slide with all its
  cells under their final labels (Pascal VOC), for ``smear data prepare`` and detector training.

Only files inside OUT are read (``OUT/fields/``); only DIR is written.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from .store import ReviewStore, safe_name

EXPORT_CROP_PX = 128
EXPORT_MARGIN = 0.15  # the classifier's inference margin: a crop here is what the classifier sees of a box


def export_reviewed(out: Path, dest: Path) -> dict:
    """Write the export; returns ``{"cells": {class: n}, "fields": n, "skipped": [...]}``."""
    import cv2

    from smear.data.crops import crop_cell

    from ..annotate import voc_xml
    from .app import inside

    store = ReviewStore(out)
    dest = Path(dest)
    per_class: Counter = Counter()
    n_fields, skipped = 0, []
    for s in store.slides():
        if s["status"] == "new":
            continue
        signed = s["status"] == "signed off"
        cells = store.cells(s["slide"])
        images: dict[int, object] = {}
        for c in cells:
            if not (signed or c["accepted"]):
                continue
            f = store.field(c["field"])
            src = inside(store.out, store.out / "fields" / f["file"]) if f["file"] else None
            if src is None:
                skipped.append(f"{f['image']}: no copy in {store.out / 'fields'} (analyse with --fields)")
                continue
            if c["field"] not in images:
                images[c["field"]] = cv2.imread(str(src), cv2.IMREAD_COLOR)
            img = images[c["field"]]
            if img is None:
                skipped.append(f"{src}: cannot be decoded")
                continue
            d = dest / c["final_label"].lower()
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{safe_name(s['slide'])}_{c['id']}.png"),
                        crop_cell(img, c["box"], EXPORT_MARGIN, EXPORT_CROP_PX))
            per_class[c["final_label"]] += 1
        for f, result in store.corrected_results(s["slide"]):
            src = inside(store.out, store.out / "fields" / f["file"]) if f["file"] else None
            if src is None or result.error:
                continue
            voc = dest / "voc"
            voc.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, voc / src.name)
            (voc / f"{src.stem}.xml").write_text(voc_xml(voc / src.name, result, result.cells, "subtypes"))
            n_fields += 1
    return {"cells": dict(per_class), "fields": n_fields, "skipped": sorted(set(skipped))}
