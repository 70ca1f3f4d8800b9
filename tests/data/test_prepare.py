"""``prepare_dataset`` on tiny drawn VOC sets: audit, subtypes, splits, YOLO labels, crops, other formats."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import draw_field, write_voc

from smear.configs.errors import SmearError
from smear.data.boxes import box_iou
from smear.data.config import DataConfig
from smear.data.crops import crop_cell
from smear.data.formats import SPLITS, AnnotatedImage, read_source, read_subtypes
from smear.data.prepare import prepare_dataset
from smear.data.splits import assign_splits
from smear.data.taxonomy import CELL_CLASSES, GROUPS, group_of

MANIFEST_COLUMNS = ["crop_path", "source_image", "image_id", "x1", "y1", "x2", "y2", "label", "group", "split",
                    "source"]
AUDIT_COLUMNS = ["image_id", "label", "box", "action", "reason"]


def _wbc_box(seed: int) -> tuple[int, int, int, int]:
    return next(b for lab, b in draw_field(seed=seed)[1] if lab == "WBC")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_subtypes(path: Path, rows: dict[int, str]) -> Path:
    """BCCD's layout: an unnamed index column, then Image (number) and Category."""
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["", "Image", "Category"])
        for num, cat in rows.items():
            wr.writerow(["", num, cat])
    return path


def _drop_objects(xml: Path, label: str) -> None:
    text = xml.read_text()
    xml.write_text(re.sub(rf"<object><name>{label}</name>.*?</object>", "", text))


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    """One prepared 8-image VOC set with every kind of defect the audit handles."""
    root = tmp_path_factory.mktemp("defects")
    w0 = _wbc_box(2)
    extra = {
        "BloodImage_00000": [("RBC", (100, 100, 90, 150))],                     # degenerate: xmax < xmin
        "BloodImage_00001": [("RBC", (-10, 20, 30, 60))],                       # crosses the left border
        "BloodImage_00002": [("WBC", (w0[0] + 1, w0[1] + 1, w0[2] + 1, w0[3]))],  # near-duplicate of the WBC
        "BloodImage_00004": [("WBC", (500, 300, 600, 400))],                    # a second WBC (both eosinophils)
        "BloodImage_00005": [("Blast", (10, 10, 60, 60)), ("RBC", (700, 10, 760, 60))],  # unknown class; outside
    }
    voc = write_voc(root / "voc", n_images=8, extra_objects=extra)
    _drop_objects(voc / "Annotations" / "BloodImage_00003.xml", "WBC")
    subtypes = _write_subtypes(root / "wbc_subtypes.csv", {
        0: "NEUTROPHIL", 1: "NEUTROPHIL, EOSINOPHIL", 2: "LYMPHOCYTE", 4: "EOSINOPHIL,EOSINOPHIL", 6: "MONOCYTE",
        7: "",
    })
    out = root / "out"
    summary = prepare_dataset([voc], out, DataConfig(), subtypes_csv=subtypes)
    return {"voc": voc, "out": out, "summary": summary, "audit": _read_csv(out / "audit.csv"),
            "manifest": _read_csv(out / "crops" / "manifest.csv")}


def _audit_for(d, image_id: str) -> list[dict]:
    return [r for r in d["audit"] if r["image_id"] == image_id]


def test_clean_set_has_empty_audit(tiny_voc, tmp_path):
    s = prepare_dataset([tiny_voc], tmp_path / "out", DataConfig())
    assert s.images == 6 and s.failed_images == [] and s.audit_counts == {}
    assert s.boxes_per_class == {"RBC": 72, "WBC": 6, "Platelets": 12}
    assert _read_csv(tmp_path / "out" / "audit.csv") == []
    assert (tmp_path / "out" / "audit.csv").read_text().splitlines()[0].split(",") == AUDIT_COLUMNS
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == 6


def test_degenerate_box_dropped_with_reason(defects):
    rows = [r for r in _audit_for(defects, "BloodImage_00000") if r["action"] == "dropped"]
    assert len(rows) == 1 and rows[0]["label"] == "RBC" and "degenerate" in rows[0]["reason"]
    assert rows[0]["box"] == "100,100,90,150"
    assert not any(r["image_id"] == "BloodImage_00000" and float(r["x2"]) <= float(r["x1"]) for r in defects["manifest"])


def test_box_crossing_border_is_clipped(defects):
    rows = [r for r in _audit_for(defects, "BloodImage_00001") if r["action"] == "clipped"]
    assert len(rows) == 1 and "border" in rows[0]["reason"] and "now 0,20,30,60" in rows[0]["reason"]
    boxes = [(float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"]))
             for r in defects["manifest"] if r["image_id"] == "BloodImage_00001"]
    assert (0.0, 20.0, 30.0, 60.0) in boxes
    assert all(x1 >= 0 and y1 >= 0 and x2 <= 640 and y2 <= 480 for x1, y1, x2, y2 in boxes)


def test_near_duplicate_dropped(defects):
    rows = [r for r in _audit_for(defects, "BloodImage_00002") if r["action"] == "dropped"]
    assert len(rows) == 1 and rows[0]["label"] == "WBC" and "near-duplicate" in rows[0]["reason"]
    wbcs = [r for r in defects["manifest"] if r["image_id"] == "BloodImage_00002" and r["group"] == "WBC"]
    assert len(wbcs) == 1
    # the single remaining WBC received the image's single subtype label
    assert wbcs[0]["label"] == "Lymphocyte"


def test_unknown_class_and_box_outside_image_dropped(defects):
    reasons = [r["reason"] for r in _audit_for(defects, "BloodImage_00005") if r["action"] == "dropped"]
    assert any("unknown class 'Blast'" in r for r in reasons)
    assert any("outside the image" in r for r in reasons)
    assert all(r["label"] in CELL_CLASSES + ("WBC",) for r in defects["manifest"])


def test_image_without_wbc_noted_and_kept(defects):
    rows = _audit_for(defects, "BloodImage_00003")
    assert [r["reason"] for r in rows if r["action"] == "note"] == ["image has no WBC box (kept)"]
    labels = Counter(r["group"] for r in defects["manifest"] if r["image_id"] == "BloodImage_00003")
    assert labels["WBC"] == 0 and labels["RBC"] == 12
    assert (defects["out"] / "yolo" / "labels" / "train" / "BloodImage_00003.txt").is_file()


def test_wbc_named_by_the_subtype_table_but_unboxed_is_listed_as_incomplete(tmp_path):
    from smear.detector.evaluate import read_incomplete_labels

    # train 0, 1; val 2; test 3, whose WBC the labeller boxed as a platelet
    voc = write_voc(tmp_path / "voc", n_images=4, extra_objects={"BloodImage_00003": [("Platelets", (300, 200, 460, 360))]})
    for i in (1, 2, 3):
        _drop_objects(voc / "Annotations" / f"BloodImage_{i:05d}.xml", "WBC")
    # 0 keeps its box; 1 and 3 lost theirs though the table names one; 2 has neither box nor name
    subtypes = _write_subtypes(tmp_path / "wbc_subtypes.csv", {0: "NEUTROPHIL", 1: "BASOPHIL", 3: "EOSINOPHIL"})
    prepare_dataset([voc], tmp_path / "out", DataConfig(), subtypes_csv=subtypes)
    rows = _read_csv(tmp_path / "out" / "yolo" / "incomplete_labels.csv")
    assert [(r["image"], r["split"], r["class"]) for r in rows] == [("BloodImage_00001", "train", "WBC"),
                                                                  ("BloodImage_00003", "test", "WBC")]
    assert "Basophil" in rows[0]["reason"] and "wrong class" not in rows[0]["reason"]
    assert "Platelets box 300,200,460,360 is larger than its median RBC" in rows[1]["reason"]
    assert "ignores WBC detections" in rows[0]["reason"] and "scores that box as the WBC" in rows[1]["reason"]
    audit = _read_csv(tmp_path / "out" / "audit.csv")
    assert sorted(r["image_id"] for r in audit if r["reason"].startswith("WBC box missing")) == \
        ["BloodImage_00001", "BloodImage_00003"]
    data_yaml = tmp_path / "out" / "yolo" / "data.yaml"
    assert read_incomplete_labels(data_yaml, "test") == {"BloodImage_00003": {GROUPS.index("WBC")}}
    assert read_incomplete_labels(data_yaml, "val") == {}


@pytest.mark.parametrize("relabel", [True, False])
def test_a_training_wbc_boxed_as_a_platelet_is_relabelled_in_training_data_only(tmp_path, relabel):
    """BCCD 00133: in train, the WBC boxed as a platelet becomes that WBC (subtype from the table) for the
    detector and the classifier; in test (00003 here) the official labels stay and the audit lists it."""
    voc = write_voc(tmp_path / "voc", n_images=4, extra_objects={
        "BloodImage_00000": [("Platelets", (300, 200, 460, 360))], "BloodImage_00003": [("Platelets", (300, 200, 460, 360))]})
    for i in (0, 3):
        _drop_objects(voc / "Annotations" / f"BloodImage_{i:05d}.xml", "WBC")
    subtypes = _write_subtypes(tmp_path / "wbc_subtypes.csv", {0: "EOSINOPHIL", 3: "EOSINOPHIL"})
    prepare_dataset([voc], tmp_path / "out", DataConfig(relabel_train_wbc=relabel), subtypes_csv=subtypes)
    rows = _read_csv(tmp_path / "out" / "yolo" / "incomplete_labels.csv")
    assert [r["image"] for r in rows] == (["BloodImage_00003"] if relabel else ["BloodImage_00000", "BloodImage_00003"])
    manifest = _read_csv(tmp_path / "out" / "crops" / "manifest.csv")
    big = [r["label"] for r in manifest if r["image_id"] == "BloodImage_00000" and float(r["x1"]) == 300]
    assert big == (["Eosinophil"] if relabel else ["Platelets"])
    labels = (tmp_path / "out" / "yolo" / "labels" / "train" / "BloodImage_00000.txt").read_text().splitlines()
    assert sum(line.startswith(f"{GROUPS.index('WBC')} ") for line in labels) == (1 if relabel else 0)
    test_labels = (tmp_path / "out" / "yolo" / "labels" / "test" / "BloodImage_00003.txt").read_text().splitlines()
    assert not any(line.startswith(f"{GROUPS.index('WBC')} ") for line in test_labels)  # official labels kept
    audit = _read_csv(tmp_path / "out" / "audit.csv")
    assert [r["image_id"] for r in audit if r["action"] == "relabelled"] == (["BloodImage_00000"] if relabel else [])


def test_subtype_labels_assigned_only_when_unambiguous(defects):
    wbc_labels = {}
    for r in defects["manifest"]:
        if r["group"] == "WBC":
            wbc_labels.setdefault(r["image_id"], []).append(r["label"])
    assert wbc_labels["BloodImage_00000"] == ["Neutrophil"]      # one box, one label
    assert wbc_labels["BloodImage_00001"] == ["WBC"]             # one box, two labels: ambiguous
    assert wbc_labels["BloodImage_00004"] == ["Eosinophil"] * 2  # two boxes, two equal labels
    assert wbc_labels["BloodImage_00006"] == ["Monocyte"]
    assert wbc_labels["BloodImage_00007"] == ["WBC"]             # empty category
    assert wbc_labels["BloodImage_00005"] == ["WBC"]             # not in the csv: no note, stays WBC
    notes = [r for r in _audit_for(defects, "BloodImage_00001") if r["action"] == "note"]
    assert len(notes) == 1 and "not assignable" in notes[0]["reason"] and "Neutrophil" in notes[0]["reason"]
    assert not [r for r in _audit_for(defects, "BloodImage_00005") if "assignable" in r["reason"]]
    crops = defects["summary"].crops_per_label
    assert crops["Neutrophil"] == 1 and crops["Eosinophil"] == 2 and crops["Lymphocyte"] == 1
    assert crops["WBC"] == 3  # images 1, 5, 7


def test_read_subtypes_bccd_layout(tmp_path):
    p = _write_subtypes(tmp_path / "s.csv", {3: "NEUTROPHIL", 10: "NEUTROPHIL, EOSINOPHIL", 11: "basophil",
                                             12: "", 13: "BLAST"})
    with open(p, "a") as f:
        f.write(",,\n,x,NEUTROPHIL\n")  # rows without an image number are skipped
    got = read_subtypes(p)
    assert got == {"BloodImage_00003": ["Neutrophil"], "BloodImage_00010": ["Neutrophil", "Eosinophil"],
                   "BloodImage_00011": ["Basophil"], "BloodImage_00012": [], "BloodImage_00013": []}


def test_official_split_kept(defects):
    s = defects["summary"]
    assert s.images == 8 and s.images_per_split == {"train": 4, "val": 2, "test": 2}
    expected = {f"BloodImage_{i:05d}": ("train" if i < 4 else "val" if i < 6 else "test") for i in range(8)}
    for r in defects["manifest"]:
        assert r["split"] == expected[r["image_id"]]
    for split in SPLITS:
        names = sorted(p.stem for p in (defects["out"] / "yolo" / "images" / split).iterdir())
        assert names == sorted(k for k, v in expected.items() if v == split)


def test_yolo_labels_valid_and_data_yaml(defects):
    yolo = defects["out"] / "yolo"
    data = yaml.safe_load((yolo / "data.yaml").read_text())
    assert data["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == yolo.resolve()
    for split in SPLITS:
        assert data[split] == f"images/{split}"
        assert (yolo / data[split]).is_dir()
    counts: Counter = Counter()
    for split in SPLITS:
        images = sorted(p.stem for p in (yolo / "images" / split).iterdir())
        labels = sorted(p.stem for p in (yolo / "labels" / split).glob("*.txt"))
        assert images == labels  # every image has a label file, even an empty one
        for lbl in (yolo / "labels" / split).glob("*.txt"):
            for line in lbl.read_text().splitlines():
                parts = line.split()
                assert len(parts) == 5, line
                c = int(parts[0])
                cx, cy, w, h = map(float, parts[1:])
                assert c in (0, 1, 2)
                assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx <= 1 and 0 <= cy <= 1
                assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6 and cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6
                counts[GROUPS[c]] += 1
    assert dict(counts) == defects["summary"].boxes_per_class
    # label lines match the manifest boxes of that image
    rows = [r for r in defects["manifest"] if r["image_id"] == "BloodImage_00001"]
    lines = (yolo / "labels" / "train" / "BloodImage_00001.txt").read_text().splitlines()
    assert len(lines) == len(rows)
    c, cx, cy, w, h = lines[0].split()
    r = rows[0]
    assert GROUPS[int(c)] == r["group"]
    assert float(cx) == pytest.approx((float(r["x1"]) + float(r["x2"])) / 2 / 640, abs=1e-5)
    assert float(w) == pytest.approx((float(r["x2"]) - float(r["x1"])) / 640, abs=1e-5)


def test_manifest_columns_and_crops(defects):
    crops = defects["out"] / "crops"
    header = (crops / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header == MANIFEST_COLUMNS
    assert len(defects["manifest"]) == sum(defects["summary"].crops_per_label.values())
    for r in defects["manifest"][:20]:
        img = cv2.imread(str(crops / r["crop_path"]))
        assert img is not None and img.shape == (128, 128, 3)
        assert Path(r["source_image"]).is_absolute() and Path(r["source_image"]).is_file()
        assert r["group"] == group_of(r["label"]) and r["split"] in SPLITS
        assert Path(r["crop_path"]).parts[:2] == (r["split"], r["label"])
        assert r["source"] and r["source"] == r["source"].lower()  # the source folder's name, for leave-one-lab-out


def test_missing_and_broken_images_reported_others_kept(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=6)
    (voc / "JPEGImages" / "BloodImage_00002.jpg").unlink()
    (voc / "JPEGImages" / "BloodImage_00004.jpg").write_bytes(b"not a jpeg at all")
    s = prepare_dataset([voc], tmp_path / "out", DataConfig())
    assert s.images == 4
    assert len(s.failed_images) == 2
    assert any("BloodImage_00002" in f and "not found" in f for f in s.failed_images)
    assert any("BloodImage_00004" in f and "cannot be decoded" in f for f in s.failed_images)
    audit = _read_csv(tmp_path / "out" / "audit.csv")
    assert sorted(r["image_id"] for r in audit if r["action"] == "image skipped") == \
        ["BloodImage_00002", "BloodImage_00004"]
    ids = {r["image_id"] for r in _read_csv(tmp_path / "out" / "crops" / "manifest.csv")}
    assert ids == {"BloodImage_00000", "BloodImage_00001", "BloodImage_00003", "BloodImage_00005"}


def test_source_without_imagesets_gets_deterministic_split(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=10, splits=False)
    cfg = DataConfig(val_fraction=0.3, test_fraction=0.3)
    a = prepare_dataset([voc], tmp_path / "a", cfg)
    b = prepare_dataset([voc], tmp_path / "b", cfg)
    assert a.images == 10 and a.images_per_split == b.images_per_split
    split_a = {r["image_id"]: r["split"] for r in _read_csv(tmp_path / "a" / "crops" / "manifest.csv")}
    split_b = {r["image_id"]: r["split"] for r in _read_csv(tmp_path / "b" / "crops" / "manifest.csv")}
    assert split_a == split_b and len(split_a) == 10
    # split by image: all crops of one image share a split
    per_image: dict[str, set] = {}
    for r in _read_csv(tmp_path / "a" / "crops" / "manifest.csv"):
        per_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in per_image.values())


def test_assign_splits_fractions_and_seed():
    def split(seed: int) -> dict[str, str]:
        items = [AnnotatedImage(f"img{i}", Path(f"img{i}.jpg"), 10, 10) for i in range(2000)]
        assign_splits(items, DataConfig(split_seed=seed))
        return {a.image_id: a.split for a in items}

    s0 = split(0)
    assert s0 == split(0)
    counts = Counter(s0.values())
    assert abs(counts["test"] / 2000 - 0.2) < 0.04 and abs(counts["val"] / 2000 - 0.2) < 0.04
    assert split(1) != s0
    kept = AnnotatedImage("x", Path("x.jpg"), 10, 10, split="val")
    assign_splits([kept], DataConfig())
    assert kept.split == "val"


def test_several_sources_merge_with_unique_ids(tmp_path):
    a = write_voc(tmp_path / "a", n_images=2)
    b = write_voc(tmp_path / "b", n_images=2)
    s = prepare_dataset([a, b], tmp_path / "out", DataConfig())
    assert s.images == 4
    ids = {r["image_id"] for r in _read_csv(tmp_path / "out" / "crops" / "manifest.csv")}
    assert ids == {"src0/BloodImage_00000", "src0/BloodImage_00001", "src1/BloodImage_00000", "src1/BloodImage_00001"}
    assert len(list((tmp_path / "out" / "yolo" / "images" / "train").iterdir())) == 2


def test_read_source_yolo_data_yaml_round_trip(defects):
    items = read_source(defects["out"] / "yolo" / "data.yaml")
    assert len(items) == 8
    assert Counter(a.split for a in items) == Counter({"train": 4, "val": 2, "test": 2})
    assert Counter(group_of(b.label) for a in items for b in a.boxes) == Counter(defects["summary"].boxes_per_class)
    one = next(a for a in items if a.image_id == "BloodImage_00001")
    assert (one.width, one.height) == (640, 480)
    assert any(b.xyxy == pytest.approx((0, 20, 30, 60), abs=0.01) for b in one.boxes)
    # the folder holding data.yaml works too
    assert len(read_source(defects["out"] / "yolo")) == 8


def test_read_source_handwritten_yolo_with_list_names(tmp_path):
    img, _ = draw_field(seed=3)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "val" / "f.png"), img)
    (tmp_path / "labels" / "val" / "f.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.1 0.1 0.1 0.1 0.9\nbad line\n")
    (tmp_path / "data.yaml").write_text("path: .\nval: images/val\nnames: [rbc, wbc, platelets]\n")
    (item,) = read_source(tmp_path / "data.yaml")
    assert item.split == "val" and (item.width, item.height) == (640, 480)
    assert [b.label for b in item.boxes] == ["WBC", "RBC"]
    assert item.boxes[0].xyxy == pytest.approx((240, 120, 400, 360))
    assert item.boxes[1].score == pytest.approx(0.9)


def test_read_source_coco_json_and_prepare(tmp_path):
    img, boxes = draw_field(seed=5)
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cats = [{"id": 1, "name": "rbc"}, {"id": 2, "name": "WBC"}, {"id": 3, "name": "platelet"}]
    cat_id = {"RBC": 1, "WBC": 2, "Platelets": 3}
    anns = [{"id": k, "image_id": 7, "category_id": cat_id[lab], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for k, (lab, b) in enumerate(boxes)]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 480}], "annotations": anns,
        "categories": cats}))
    (item,) = read_source(tmp_path / "ann.json")
    assert item.image_path == tmp_path / "a.jpg" and (item.width, item.height) == (640, 480)
    assert Counter(b.label for b in item.boxes) == Counter({"RBC": 12, "WBC": 1, "Platelets": 2})
    assert item.boxes[0].xyxy == pytest.approx(boxes[0][1])
    s = prepare_dataset([tmp_path / "ann.json"], tmp_path / "out", DataConfig())
    assert s.images == 1 and s.boxes_per_class == {"RBC": 12, "WBC": 1, "Platelets": 2}


def test_read_source_errors(tmp_path):
    with pytest.raises(SmearError, match="source not found"):
        read_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmearError, match="no VOC"):
        read_source(tmp_path / "empty")


def test_crop_cell_square_and_edge_replicated():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = 255
    crop = crop_cell(img, (0, 0, 20, 10), 0.15, 32)
    assert crop.shape == (32, 32, 3)
    assert crop.min() == 255  # outside-image pixels replicate the (white) border, never black
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
