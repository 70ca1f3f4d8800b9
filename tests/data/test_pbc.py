"""PBC single cells as classifier rows: classes, content-hashed splits, the centred cell's box, other labs' fields."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from smear.configs.errors import SmearError
from smear.data.pbc import build_pbc_manifest, centred_box, field_rows, list_pbc
from smear.data.taxonomy import GROUPS


def _pbc(root: Path, n_per_class: int = 3) -> Path:
    rows = []
    for k, folder in enumerate(("neutrophil", "ig", "erythroblast", "platelet")):
        (root / folder).mkdir(parents=True)
        for i in range(n_per_class):
            img = np.full((120, 110, 3), 200, np.uint8)
            cv2.circle(img, (55, 60), 12 + k, (120, 40, 120), -1)
            img[0, 0] = (k, i, 7)  # distinct bytes per image
            cv2.imwrite(str(root / folder / f"{folder}_{i}.png"), img)
            rows.append({"image": f"{folder}/{folder}_{i}.png", "class": folder, "subclass": ""})
    # the same picture twice (as PBC fields repeat pbc images): one content, one split
    (root / "neutrophil" / "copy.png").write_bytes((root / "neutrophil" / "neutrophil_0.png").read_bytes())
    rows.append({"image": "neutrophil/copy.png", "class": "neutrophil", "subclass": ""})
    with open(root / "labels.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "class", "subclass"])
        wr.writeheader()
        wr.writerows(rows)
    return root


def test_classes_are_smears_names_and_splits_follow_the_bytes(tmp_path):
    images = list_pbc(_pbc(tmp_path / "pbc"), val_fraction=0.3, test_fraction=0.3)
    assert {i.label for i in images} == {"Neutrophil", "ImmatureGranulocyte", "Erythroblast", "Platelets"}
    by_name = {i.path.name: i for i in images}
    assert by_name["copy.png"].image_id == by_name["neutrophil_0.png"].image_id
    assert by_name["copy.png"].split == by_name["neutrophil_0.png"].split
    assert len({i.image_id for i in images}) == len(images) - 1


def test_unknown_class_is_refused(tmp_path):
    root = _pbc(tmp_path / "pbc")
    with open(root / "labels.csv", "a") as f:
        f.write("x/blast.png,blast,\n")
    with pytest.raises(SmearError, match="blast"):
        list_pbc(root)


def _found(boxes, groups):
    return SimpleNamespace(boxes=np.array(boxes, float), classes=np.array([GROUPS.index(g) for g in groups]))


def test_centred_box_is_the_wanted_group_covering_the_centre():
    found = _found([[0, 0, 30, 30], [40, 40, 80, 80], [45, 45, 70, 70], [20, 20, 90, 90]],
                   ["WBC", "RBC", "WBC", "WBC"])
    box = centred_box(found, (120, 120), ("WBC",))
    assert list(box) == [45, 45, 70, 70]  # covers (60, 60), centre nearest; the RBC and the far box are passed over
    assert centred_box(found, (120, 120), ("Platelets",)) is None
    assert centred_box(_found([], []), (120, 120), ("WBC",)) is None


def test_manifest_boxes_by_detector_or_median_and_keeps_other_labs_fields(tmp_path):
    root = _pbc(tmp_path / "pbc")

    def propose(rgb):  # finds the centred cell, except on the first platelet image (a detector may miss one)
        h, w = rgb.shape[:2]
        r = 10 + int(rgb[0, 0, 1])  # the image's number: boxes of side 20, 22, 24
        if rgb[0, 0].tolist() == [7, 0, 3]:
            return _found([], [])
        group = "Platelets" if rgb[0, 0, 2] == 3 else "WBC"
        return _found([[w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r]], [group])

    image = tmp_path / "raabin_1.jpg"
    cv2.imwrite(str(image), np.full((50, 50, 3), 180, np.uint8))
    fields = [SimpleNamespace(image=image, source="raabin", split="train",
                              boxes=(("WBC", 1, 1, 20, 20), ("RBC", 20, 20, 40, 40))),
              SimpleNamespace(image=image, source="pbc", split="train",
                              boxes=(("WBC", 1, 1, 20, 20), ("Platelets", 30, 30, 36, 36))),
              SimpleNamespace(image=image, source="bccd", split="train", boxes=(("RBC", 1, 1, 9, 9),))]
    path = build_pbc_manifest(root, tmp_path / "out", propose, fields=fields)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pbc = [r for r in rows if r["box_from"] != "label"]
    assert len(pbc) == 13 and {r["source"] for r in pbc} == {"pbc"}
    missed = [r for r in pbc if r["box_from"] == "median"]
    assert [r["source_image"].endswith("platelet_0.png") for r in missed] == [True]
    side = float(missed[0]["x2"]) - float(missed[0]["x1"])
    assert side == pytest.approx(23)  # the median side of the other platelets' boxes (22, 24)
    assert all(float(r["x2"]) > float(r["x1"]) for r in rows)
    other = [(r["source"], r["label"]) for r in rows if r["box_from"] == "label"]
    # Raabin's WBC is a group-only row; a PBC field's WBC is the pbc image's centred cell (left out); BCCD not here
    assert other == [("raabin", "WBC"), ("raabin", "RBC"), ("pbc", "Platelets")]


def test_field_rows_split_like_the_pbc_images(tmp_path):
    root = _pbc(tmp_path / "pbc")
    images = list_pbc(root)
    field = SimpleNamespace(image=images[0].path, source="pbc", split="train", boxes=(("RBC", 1, 1, 9, 9),))
    (row,) = field_rows([field])
    assert row["split"] == images[0].split and row["image_id"] == f"pbc_{images[0].image_id}"
