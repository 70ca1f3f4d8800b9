"""Detector stage: tiling and cross-tile merging, offline behaviour, model lookup errors."""

from __future__ import annotations

import numpy as np
import pytest

from smear.configs.errors import ModelNotFoundError
from smear.detector.predict import Detections, drop_edge_fragments, keep_above, merge_tiles, tile_origins


def test_tile_origins_cover_with_overlap():
    starts = tile_origins(2000, 640, 256)
    assert starts[0] == 0 and starts[-1] == 2000 - 640
    assert all(b - a <= 640 - 256 for a, b in zip(starts, starts[1:]))
    assert tile_origins(500, 640, 256) == [0]


def _det(boxes, scores, classes):
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int64))


def test_merge_drops_cut_boxes_and_duplicates():
    # Image 1000 wide, two tiles [0, 640) and [360, 1000). A cell at x 600..700 is cut by tile 1's
    # right edge (seen as 600..640) and whole in tile 2; a cell at 400..480 is whole in both.
    t1 = _det([[600, 10, 640, 90], [400, 10, 480, 90]], [0.9, 0.8], [0, 0])
    t2 = _det([[600, 10, 700, 90], [401, 11, 481, 91]], [0.85, 0.7], [0, 0])
    merged = merge_tiles([(t1, (0, 0, 640, 100)), (t2, (360, 0, 1000, 100))], (1000, 100), iou=0.5)
    assert len(merged) == 2
    xs = sorted(merged.boxes[:, 0].tolist())
    assert xs == [400, 600]
    assert merged.boxes[merged.boxes[:, 0] == 600][0, 2] == 700  # the whole cell, not the cut one


def test_merge_keeps_boxes_on_the_image_border():
    t = _det([[0, 0, 50, 50]], [0.9], [2])
    merged = merge_tiles([(t, (0, 0, 640, 640))], (640, 640), iou=0.5)
    assert len(merged) == 1


def _field(boxes, classes):
    b = np.array(boxes, np.float32)
    return Detections(b, np.full(len(b), 0.9, np.float32), np.array(classes))


def test_edge_fragments_counted_only_with_their_centre_inside():
    # Four whole RBCs (40 px) set the typical size; on the border: a sliver (10 px inside), a cell with
    # 30 px inside (centre inside), a sliver at the bottom, and a small WBC sliver (WBCs are not judged).
    inner = [[100, 100, 140, 140], [200, 100, 240, 140], [300, 100, 340, 140], [100, 200, 140, 240]]
    edge = [[0, 300, 10, 340], [0, 400, 30, 440], [500, 470, 540, 480], [600, 0, 640, 8]]
    det = _field(inner + edge, [0, 0, 0, 0, 0, 0, 0, 1])
    kept = drop_edge_fragments(det, (640, 480), 0.5)
    assert kept.boxes.tolist() == (inner + [[0, 400, 30, 440], [600, 0, 640, 8]])
    assert kept.classes.tolist() == [0, 0, 0, 0, 0, 1]
    assert len(drop_edge_fragments(det, (640, 480), 0.0)) == len(det)  # 0 keeps every fragment
    assert len(drop_edge_fragments(det, (640, 480), 0.9)) == 5  # the 30 px cell is < 0.9 x 40 px


def test_keep_above_applies_each_class_its_own_threshold():
    det = _det([[0, 0, 10, 10]] * 6, [0.3, 0.5, 0.3, 0.5, 0.5, 0.6], [0, 0, 1, 1, 2, 2])
    kept = keep_above(det, {"RBC": 0.4, "WBC": 0.2, "Platelets": 0.55})
    assert kept.scores.tolist() == pytest.approx([0.5, 0.3, 0.5, 0.6])
    assert kept.classes.tolist() == [0, 1, 1, 2]
    assert len(keep_above(det, {"Platelets": 0.9})) == 4  # classes not named keep everything


def test_predict_with_per_class_thresholds_filters_one_low_threshold_run(tiny_detector):
    """conf as a mapping: the same boxes as one run at the lowest threshold, each cut at its class's own."""
    from smear.detector.config import DetectorConfig
    from smear.detector.predict import Detector
    from tests.conftest import draw_field

    field, _ = draw_field(seed=5)
    det = Detector(tiny_detector, cfg=DetectorConfig(imgsz=320, conf=0.0001, max_det=50))
    low = det.predict([field], conf=0.0001)[0]
    assert len(low) > 3
    cut = float(np.median(low.scores))
    thresholds = {"RBC": cut, "WBC": 0.0001, "Platelets": cut}
    mixed = det.predict([field], conf=thresholds)[0]
    expect = keep_above(low, thresholds)
    assert 0 < len(mixed) < len(low)
    np.testing.assert_allclose(mixed.boxes, expect.boxes, atol=1e-3)
    assert mixed.classes.tolist() == expect.classes.tolist()


def test_tiled_prediction_matches_untiled_on_repeated_fields(tiny_detector):
    """A large mosaic is tiled; every returned box lies inside the image and none is cut by a tile edge."""
    from smear.detector.config import DetectorConfig
    from smear.detector.predict import Detector
    from tests.conftest import draw_field

    field, _ = draw_field(seed=3)
    big = np.tile(field, (3, 3, 1))  # 1440 x 1920
    det = Detector(tiny_detector, cfg=DetectorConfig(imgsz=320, tile_px=640, tile_overlap_px=256, conf=0.0001,
                                                     max_det=20))
    out = det.predict([big])[0]
    assert len(out) > 0
    assert (out.boxes[:, 0] >= 0).all() and (out.boxes[:, 2] <= big.shape[1] + 1).all()
    assert (out.boxes[:, 3] <= big.shape[0] + 1).all()


def test_missing_weights_error_says_where_and_how(tmp_path):
    from smear.detector.model import find_detector

    with pytest.raises(ModelNotFoundError) as e:
        find_detector(tmp_path / "nothing")
    msg = str(e.value)
    assert str(tmp_path / "nothing") in msg and "smear detector train" in msg


def _perturbed_copy(src, dest, shift: float):
    """A copy of a detector folder whose floating-point tensors are all shifted by ``shift``."""
    import shutil

    import torch

    shutil.copytree(src, dest)
    ckpt = torch.load(dest / "weights.pt", weights_only=False)
    with torch.no_grad():
        for t in ckpt["model"].state_dict().values():
            if t.is_floating_point():
                t += shift
    torch.save(ckpt, dest / "weights.pt")
    return dest


def test_interpolation_mixes_the_two_models_tensor_by_tensor(tiny_detector, tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    tuned = _perturbed_copy(tiny_detector, tmp_path / "tuned", 0.5)
    out = tmp_path / "mixed"
    res = CliRunner().invoke(app, ["detector", "interpolate", str(tiny_detector), str(tuned), "--alpha", "0.25",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    sd = {n: torch.load(p / "weights.pt", weights_only=False)["model"].float().state_dict()
          for n, p in (("base", tiny_detector), ("tuned", tuned), ("mixed", out))}
    floats = [k for k, v in sd["base"].items() if v.is_floating_point()]
    assert floats and all(torch.allclose(sd["mixed"][k], 0.75 * sd["base"][k] + 0.25 * sd["tuned"][k], atol=2e-3)
                          for k in floats)
    card = json.loads((out / "card.json").read_text())
    assert card["interpolation"]["alpha"] == 0.25 and card["classes"] == ["RBC", "WBC", "Platelets"]
    from smear.detector.predict import Detector

    img = np.full((320, 320, 3), 200, np.uint8)
    assert len(Detector(out).predict([img])) == 1  # ultralytics loads the result like any checkpoint


def test_interpolation_refuses_other_architectures_and_bad_alpha(tiny_detector, tmp_path):
    import torch

    from smear.configs.errors import SmearError
    from smear.configs.offline import ensure_offline
    from smear.detector.interpolate import interpolate_detectors

    ensure_offline()
    from ultralytics.nn.tasks import DetectionModel

    other = tmp_path / "other"
    other.mkdir()
    m = DetectionModel("yolov8s.yaml", nc=3, verbose=False)
    m.names = {0: "RBC", 1: "WBC", 2: "Platelets"}
    torch.save({"model": m.half(), "train_args": {"imgsz": 320}}, other / "weights.pt")
    with pytest.raises(SmearError, match="different architectures"):
        interpolate_detectors(tiny_detector, other, 0.5, tmp_path / "out")
    with pytest.raises(SmearError, match="alpha 1.5"):
        interpolate_detectors(tiny_detector, tiny_detector, 1.5, tmp_path / "out")


def test_ultralytics_cpu_device_keeps_the_threads_asked_for(restore_threads):
    """ultralytics drops torch to cores - 1 threads (1 of 2 here) when it picks the CPU; use_cpu_threads holds."""
    import os

    import torch
    from ultralytics.utils.torch_utils import select_device

    from smear.configs.offline import use_cpu_threads

    assert use_cpu_threads(0) == (os.cpu_count() or 1)  # 0: one per core
    select_device("cpu", verbose=False)
    assert torch.get_num_threads() == (os.cpu_count() or 1)
    assert use_cpu_threads(3) == 3
    select_device("cpu", verbose=False)
    assert torch.get_num_threads() == 3


def test_detector_predicts_on_its_configured_threads(tiny_detector, restore_threads):
    import torch

    from smear.detector.config import DetectorConfig
    from smear.detector.predict import Detector
    from tests.conftest import draw_field

    det = Detector(tiny_detector, cfg=DetectorConfig(imgsz=320, conf=0.0001, threads=3))
    det.predict([draw_field(seed=1)[0]])  # the first predict is where ultralytics picks the device
    assert torch.get_num_threads() == 3


def test_thresholds_minimise_the_count_error_per_group(tmp_path, monkeypatch):
    """The chooser takes, per group, the lowest candidate whose count matches the labels best."""
    import cv2
    import yaml

    import smear.detector.predict as predict
    from smear.configs.errors import SmearError
    from smear.detector.evaluate import choose_thresholds
    from smear.detector.predict import Detections

    for split in ("val",):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
    truth = {"a": (3, 1, 0), "b": (2, 0, 1)}  # RBC, WBC, Platelets labelled per image
    scores = {"a": ([0.9, 0.8, 0.7, 0.3], [0.95], []), "b": ([0.9, 0.6, 0.3], [0.25], [0.5])}
    for stem, counts in truth.items():
        cv2.imwrite(str(tmp_path / "images" / "val" / f"{stem}.png"), np.zeros((32, 32, 3), np.uint8))
        lines = [f"{g} 0.5 0.5 0.1 0.1" for g, n in enumerate(counts) for _ in range(n)]
        (tmp_path / "labels" / "val" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/val",
                                                        "val": "images/val", "names": ["RBC", "WBC", "Platelets"]}))
    order = iter(sorted(truth))

    class FakeDetector:
        def __init__(self, *a, **k):
            pass

        def predict(self, images, conf=None):
            s = scores[next(order)]
            flat = [(g, v) for g, vs in enumerate(s) for v in vs]
            return [Detections(np.zeros((len(flat), 4), np.float32), np.array([v for _, v in flat], np.float32),
                               np.array([g for g, _ in flat], np.int64))]

    monkeypatch.setattr(predict, "Detector", FakeDetector)
    res = choose_thresholds(None, split="val", data=tmp_path / "data.yaml")
    # RBC: 0.35..0.7 counts a 3 and b 2 exactly; WBC: 0.3 and above drop b's false 0.25; platelets: up to 0.5
    assert res["operating_thresholds"] == {"RBC": 0.35, "WBC": 0.3, "Platelets": 0.2}
    assert len(res["table"]) == 3 * 11 and res["images"] == 2
    with pytest.raises(SmearError, match="never on the test split"):
        choose_thresholds(None, split="test", data=tmp_path / "data.yaml")


def test_filtering_keeps_the_scale_an_image_was_detected_at():
    from smear.detector.predict import Detections, drop_edge_fragments, keep_above

    d = Detections(np.array([[0, 0, 5, 50], [100, 100, 150, 150], [200, 200, 250, 250], [300, 300, 350, 350]],
                            np.float32), np.array([0.9, 0.9, 0.3, 0.9], np.float32), np.zeros(4, np.int64),
                   scale=0.25, rbc_diameter_px=200.0, warning="w")
    for out in (drop_edge_fragments(d, (640, 480), 0.5), keep_above(d, {"RBC": 0.5})):
        assert len(out) == 3 and (out.scale, out.rbc_diameter_px, out.warning) == (0.25, 200.0, "w")


def test_auto_scale_measures_rbcs_on_the_boxes_scored_at_least_measure_conf():
    """A caller that runs the detector low for one group (wbc_rescue) must not move every field's scale: faint RBC
    boxes under ``measure_conf`` do not count towards the field's RBC size."""
    from types import SimpleNamespace

    from smear.detector.config import DetectorConfig
    from smear.detector.predict import Detections, Detector

    det = Detector.__new__(Detector)
    det.cfg = DetectorConfig()
    det.info = SimpleNamespace(card={"rbc_median_diameter_px": 100.0})
    strong = [[100 + 60 * i, 100, 150 + 60 * i, 150] for i in range(5)]  # side 50, scored 0.9
    faint = [[50 + 60 * i, 400, 250 + 60 * i, 600] for i in range(8)]  # side 200, scored 0.05
    asked = []

    def fake_predict(images, conf, iou, scale, measure_conf=None):
        asked.append(scale)
        boxes = np.array(strong + faint, np.float32)
        return [Detections(boxes, np.array([0.9] * 5 + [0.05] * 8, np.float32), np.zeros(13, np.int64))]

    det._predict = fake_predict
    img = np.zeros((800, 800, 3), np.uint8)
    (found,) = det._predict_auto_scale([img], conf=0.02, iou=0.5, measure_conf=0.3)
    assert found.rbc_diameter_px == 50.0 and asked == [1.0, 2.0]
    asked.clear()
    (found,) = det._predict_auto_scale([img], conf=0.02, iou=0.5)  # every box measured: the faint ones win
    assert found.rbc_diameter_px == 200.0 and asked == [1.0, 0.5]
