"""The onnx runtime finds the cells torch finds: a detector folder exported in place, run both ways."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported_detector(tiny_detector, tmp_path_factory):
    """A copy of the tiny detector with weights.onnx written into its folder by 'smear detector export --in-place'."""
    from smear.detector.export import export_detector

    folder = tmp_path_factory.mktemp("det_onnx") / "tiny"
    shutil.copytree(tiny_detector, folder)
    assert export_detector(folder, in_place=True) == folder
    return folder


def _matched(a, b):
    """Boxes of two Detections in one order (by box), for comparison."""
    oa, ob = np.lexsort(a.boxes.T[::-1]), np.lexsort(b.boxes.T[::-1])
    return a.boxes[oa], a.scores[oa], a.classes[oa], b.boxes[ob], b.scores[ob], b.classes[ob]


def test_in_place_export_records_which_file_is_which_runtime(exported_detector):
    from smear.configs.runtime import file_sha256

    card = json.loads((exported_detector / "card.json").read_text())
    assert card["runtimes"] == {"torch": "weights.pt", "onnx": "weights.onnx"}
    assert card["onnx_export"]["from_sha256"] == file_sha256(exported_detector / "weights.pt")
    assert card["config"]["imgsz"] == 320  # the card is the model's own, with the records added


def test_onnx_and_torch_runtimes_give_the_same_boxes_and_labels(exported_detector):
    from smear.detector.config import DetectorConfig
    from smear.detector.predict import Detector
    from tests.conftest import draw_field

    cfg = DetectorConfig(imgsz=320, conf=0.001, max_det=50)
    torch_det = Detector(exported_detector, cfg=cfg, runtime="torch")
    onnx_det = Detector(exported_detector, cfg=cfg, runtime="onnx")
    assert (torch_det.runtime, onnx_det.runtime) == ("torch", "onnx") and onnx_det.info.onnx_fallback is None
    fields = [draw_field(seed=s)[0] for s in (1, 2)] + [draw_field(seed=3, size=(500, 400))[0]]  # mixed shapes
    for batch in (fields[:2], fields):  # one batch shape (rectangular letterbox), then squares
        for a, b in zip(torch_det.predict(batch), onnx_det.predict(batch)):
            assert len(a) == len(b) > 3
            ba, sa, ca, bb, sb, cb = _matched(a, b)
            assert (ca == cb).all()
            assert np.abs(ba - bb).max() < 0.01  # px
            assert np.abs(sa - sb).max() < 1e-4


def test_a_folder_without_a_current_onnx_file_runs_on_torch_and_says_why(exported_detector, tmp_path):
    from smear.detector.predict import Detector

    bare = tmp_path / "bare"
    shutil.copytree(exported_detector, bare)
    (bare / "weights.onnx").unlink()
    det = Detector(bare, runtime="onnx")
    assert det.runtime == "torch" and "no weights.onnx" in det.info.onnx_fallback
    assert "smear detector export" in det.info.onnx_fallback

    retrained = tmp_path / "retrained"
    shutil.copytree(exported_detector, retrained)
    with open(retrained / "weights.pt", "ab") as f:  # another weights.pt than the one exported
        f.write(b"\0")
    det = Detector(retrained, runtime="onnx")
    assert det.runtime == "torch" and "not exported from this folder's weights.pt" in det.info.onnx_fallback

    cut = tmp_path / "cut"
    shutil.copytree(exported_detector, cut)
    data = (cut / "weights.onnx").read_bytes()
    (cut / "weights.onnx").write_bytes(data[: len(data) // 2])  # truncated
    det = Detector(cut, runtime="onnx")
    assert det.runtime == "torch" and "cannot be read by ONNX Runtime" in det.info.onnx_fallback


def test_without_onnxruntime_the_pipeline_warns_once_and_runs_on_torch(tiny_detector, tiny_classifier, monkeypatch,
                                                                       caplog, field_image):
    from smear.configs import runtime
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    monkeypatch.setattr(runtime, "onnxruntime_missing", lambda: "onnxruntime is not installed")
    with caplog.at_level(logging.WARNING):
        analyzer = Analyzer(PipelineConfig(detector_weights=str(tiny_detector), classifier_weights=str(tiny_classifier),
                                           morphology_weights="none", scale="1"))
    warnings = [r for r in caplog.records if "runtime onnx" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert analyzer.detector.runtime == analyzer.classifier.runtime == "torch"
    assert analyzer.analyze_images([field_image])[0].error is None
