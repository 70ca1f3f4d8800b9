"""Point-labelled fields (Chula layout) turned into detector training windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import draw_field


def _bgr(img_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img_rgb[..., ::-1])


def test_point_boxes_from_the_mask_fit_the_drawn_cells():
    from smear.data.pointlabels import point_boxes

    img, boxes = draw_field(seed=3, n_rbc=8, n_wbc=0, n_plt=0)
    rbc = [b for lab, b in boxes if lab == "RBC"]
    pts = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in rbc]
    got, sources = point_boxes(_bgr(img), pts, np.zeros((0, 4), np.float32), default_side_px=80)
    assert len(got) == len(rbc)
    isolated = 0
    for b, g, s in zip(rbc, got, sources):
        if s == "mask":  # drawn discs that touch another one fall back to a median square
            isolated += 1
            assert np.abs(np.array(b, np.float32) - g).max() <= 3
        else:
            assert s == "median"
            assert g[0] <= pts[rbc.index(b)][0] <= g[2]
    assert isolated >= 4


def test_a_detected_box_holding_the_point_wins_over_the_mask():
    from smear.data.pointlabels import point_boxes

    img, boxes = draw_field(seed=3, n_rbc=6, n_wbc=0, n_plt=0)
    b = np.array(boxes[0][1], np.float32)
    det = np.array([b + [-4, -4, 4, 4]], np.float32)
    got, sources = point_boxes(_bgr(img), [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)], det, default_side_px=80)
    assert sources == ["detector"] and np.allclose(got[0], det[0])


def test_point_on_background_gets_a_median_square():
    from smear.data.pointlabels import point_boxes

    img = np.full((200, 200, 3), 230, np.uint8)
    got, sources = point_boxes(img, [(100, 100)], np.zeros((0, 4), np.float32), default_side_px=40)
    assert sources == ["median"] and np.allclose(got[0], [80, 80, 120, 120])


def test_unlabelled_single_cells_become_pseudo_labels_but_not_specks_or_labelled_ones():
    from smear.data.pointlabels import unlabelled_cell_regions

    img, boxes = draw_field(seed=5, n_rbc=6, n_wbc=0, n_plt=3)
    rbc = [b for lab, b in boxes if lab == "RBC"]
    labelled = np.array([((rbc[0][0] + rbc[0][2]) / 2, (rbc[0][1] + rbc[0][3]) / 2)], np.float32)
    side = float(np.median([(b[2] - b[0]) for b in rbc]))
    got = unlabelled_cell_regions(_bgr(img), labelled, np.zeros((0, 4), np.float32), side)
    assert len(got)
    for g in got:  # never the labelled cell, never a platelet-sized speck
        assert not (g[0] <= labelled[0, 0] <= g[2] and g[1] <= labelled[0, 1] <= g[3])
        assert min(g[2] - g[0], g[3] - g[1]) >= 0.6 * side


def test_densest_window_and_clipping():
    from smear.data.pointlabels import clip_to_window, densest_window

    pts = np.array([[1500, 1100], [1550, 1150], [100, 100]], np.float32)
    x0, y0 = densest_window(pts, (1600, 1200), (640, 480))
    assert x0 + 640 > 1550 and y0 + 480 > 1150
    boxes = np.array([[0, 0, 100, 100], [600, 400, 660, 500], [620, 460, 700, 560]], np.float32)
    clipped, keep = clip_to_window(boxes, 0, 0, 640, 480)
    assert keep.tolist() == [0, 1]  # the third is less than half inside
    assert clipped[1].tolist() == [600, 400, 640, 480]


def test_sample_ids_is_deterministic_and_keeps_order():
    from smear.data.pointlabels import sample_ids

    ids = [str(i) for i in range(50)]
    a, b = sample_ids(ids, 10), sample_ids(ids, 10)
    assert a == b and len(a) == 10 and a == sorted(a, key=int)
    assert sample_ids(ids, 0) == ids


def test_build_point_augmented_set_writes_windows_and_keeps_val(tmp_path, tiny_detector):
    import cv2
    import yaml

    from smear.data.pointlabels import build_point_augmented_set

    base = tmp_path / "base" / "yolo"
    for split in ("train", "val"):
        (base / "images" / split).mkdir(parents=True)
        (base / "labels" / split).mkdir(parents=True)
    (base / "data.yaml").write_text(yaml.safe_dump({"path": str(base), "train": "images/train", "val": "images/val",
                                                    "names": {0: "RBC", 1: "WBC", 2: "Platelets"}}))
    chula = tmp_path / "chula"
    (chula / "Dataset").mkdir(parents=True)
    (chula / "Label").mkdir(parents=True)
    for i in range(3):
        img, boxes = draw_field(seed=10 + i, size=(320, 240), n_rbc=6, n_wbc=0, n_plt=0)
        cv2.imwrite(str(chula / "Dataset" / f"{i}.jpg"), _bgr(img))
        lines = [f"{(b[0] + b[2]) / 2} {(b[1] + b[3]) / 2} 0" for lab, b in boxes if lab == "RBC"]
        (chula / "Label" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    from smear.detector.predict import Detector

    det = Detector(str(tiny_detector))
    propose = lambda rgb, k: det.predict([rgb], scale=k)[0]  # noqa: E731
    data_yaml, rows = build_point_augmented_set(base, tmp_path / "out", chula, ["0", "2"], 2.0, propose)
    assert [r.image_id for r in rows] == ["0", "2"]
    cfg = yaml.safe_load(data_yaml.read_text())
    assert cfg["val"] == "images/val" and Path(cfg["path"]) == data_yaml.parent.resolve()
    for r in rows:
        im = cv2.imread(str(data_yaml.parent / "images" / "train" / f"chula_{r.image_id}.jpg"))
        assert im.shape[:2] == (480, 640)  # 320x240 at scale 2
        labels = (data_yaml.parent / "labels" / "train" / f"chula_{r.image_id}.txt").read_text().split("\n")
        assert sum(1 for line in labels if line.startswith("0 ")) >= r.points
    assert (data_yaml.parent / "point_fields_train.csv").is_file()
    with pytest.raises(Exception, match="exists"):
        build_point_augmented_set(base, tmp_path / "out", chula, ["0"], 2.0, propose)
