"""The complete-label detector set: three labs' fields, one RBC size, content-hashed splits, sources left out."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from smear.data.complete import RBC_DIAMETER_PX, list_fields, source_scale, write_yolo_set


def _fake_shared(root: Path) -> Path:
    """bccd (2 train, 1 val, 1 test field), bccd-relabel labels, and txl-external PBC / Raabin fields."""
    bccd = root / "bccd"
    (bccd / "JPEGImages").mkdir(parents=True)
    (bccd / "ImageSets" / "Main").mkdir(parents=True)
    (root / "bccd-relabel" / "labels").mkdir(parents=True)
    ids = {"train": ["BloodImage_00001", "BloodImage_00002"], "val": ["BloodImage_00003"], "test": ["BloodImage_00004"]}
    for split, names in ids.items():
        (bccd / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            cv2.imwrite(str(bccd / "JPEGImages" / f"{n}.jpg"), np.full((480, 640, 3), 200, np.uint8))
            # class order of the relabel: 0 WBC, 1 RBC, 2 Platelets; RBCs 100 px wide at 640x480
            (root / "bccd-relabel" / "labels" / f"{n}.txt").write_text(
                "1 0.3 0.3 0.15625 0.2083\n1 0.6 0.6 0.15625 0.2083\n0 0.5 0.5 0.3 0.4\n")
    ext = root / "txl-external"
    (ext / "images").mkdir(parents=True)
    (ext / "labels").mkdir(parents=True)
    rows = []
    for i in range(12):
        src, size, rbc = ("pbc", 360, 50) if i % 2 else ("raabin", 600, 150)
        name = f"{src}_{i:03d}.jpg"
        cv2.imwrite(str(ext / "images" / name), np.full((size, size, 3), 20 * i, np.uint8))  # distinct bytes
        w = rbc / size
        (ext / "labels" / name.replace(".jpg", ".txt")).write_text(f"1 0.5 0.5 {w} {w}\n2 0.2 0.2 0.05 0.05\n")
        rows.append({"image": f"images/{name}", "source": src, "width": size, "height": size, "pbc_class": ""})
    with open(ext / "sources.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return root


def test_fields_keep_bccd_official_split_and_never_take_its_test_fields(tmp_path):
    fields = list_fields(_fake_shared(tmp_path), val_fraction=0.3)
    bccd = {f.image.stem: f.split for f in fields if f.source == "bccd"}
    assert bccd == {"BloodImage_00001": "train", "BloodImage_00002": "train", "BloodImage_00003": "val"}
    assert {f.source for f in fields} == {"bccd", "pbc", "raabin"}
    assert fields == list_fields(tmp_path, val_fraction=0.3)  # the content hash gives the same split every time


def test_every_source_is_brought_to_one_rbc_size_and_a_left_out_source_is_absent(tmp_path):
    fields = list_fields(_fake_shared(tmp_path))
    scales = source_scale(fields)
    assert scales["bccd"] == pytest.approx(RBC_DIAMETER_PX / 100, rel=0.01)
    assert scales["pbc"] == pytest.approx(RBC_DIAMETER_PX / 50, rel=0.01)
    assert scales["raabin"] == pytest.approx(RBC_DIAMETER_PX / 150, rel=0.01)
    data = write_yolo_set(fields, tmp_path / "out", exclude=("pbc",))
    written = list(csv.DictReader(open(data.parent / "fields.csv")))
    assert {r["source"] for r in written} == {"bccd", "raabin"}
    raabin = next(r for r in written if r["source"] == "raabin")
    img = cv2.imread(str(data.parent / "images" / raabin["split"] / f"{raabin['image']}.jpg"))
    assert img.shape[:2] == (round(600 * scales["raabin"]),) * 2
    lines = (data.parent / "labels" / raabin["split"] / f"{raabin['image']}.txt").read_text().split("\n")
    cls, _, _, w, _ = lines[0].split()
    assert cls == "0" and float(w) * img.shape[1] == pytest.approx(RBC_DIAMETER_PX, rel=0.02)  # smear's RBC = 0
