"""The shipped models, on the shipped sample fields: what a new user sees after the README's first command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="module")
def analyzer():
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    return Analyzer(PipelineConfig())


def test_shipped_models_are_package_data():
    from smear.classifier.model import resolve_classifier_folder
    from smear.detector.model import find_detector

    det = find_detector(None)
    assert det.weights.is_file() and det.card.get("test_metrics")
    folder = resolve_classifier_folder(None)
    card = json.loads((folder / "card.json").read_text())
    assert card["classes"] == ["RBC", "Platelets", "Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil"]
    assert card.get("test_metrics")
    for f in (det.weights.parent / "card.md", folder / "card.md"):
        assert f.is_file()


def test_the_multi_lab_classifier_is_selectable_by_name_and_names_the_new_classes(tmp_path):
    from smear.classifier.model import load_classifier
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    model = load_classifier("multilab-mnv2-48")
    assert {"ImmatureGranulocyte", "Erythroblast"} <= set(model.classes)
    # the three-stage cascade: 48 px on every crop, the 128 px model on possible WBCs, the 192 px subtype stage
    assert (model.refiner.folder.name, model.subtyper.folder.name) == ("multilab-mnv2-128", "multilab-subtypes-192x2")
    assert model.subtyper.crop_size_px == 192 and "ImmatureGranulocyte" in model.subtyper.classes
    assert len(model.subtyper.net.members) == 2  # two networks averaged
    for card in (model.card, model.refiner.card):
        assert "CC BY 4.0" in card["data_sources"]["pbc"] and card["test_by_lab"]["results"]
    assert load_classifier("multilab-mnv2-128").subtyper.folder.name == "multilab-subtypes-192x2"
    r = Analyzer(PipelineConfig(classifier_weights="multilab-mnv2-48", morphology_weights="none")).analyze_images(
        [SAMPLES / "BloodImage_00007.jpg"])[0]
    wbc = max((c for c in r.cells if c.group == "WBC"), key=lambda c: c.score)
    assert wbc.label == "Neutrophil" and "Erythroblast" in r.counts


@pytest.mark.parametrize("name,subtype", [("BloodImage_00007.jpg", "Neutrophil"), ("BloodImage_00041.jpg", "Eosinophil"),
                                          ("BloodImage_00021.jpg", "Lymphocyte")])
def test_sample_fields_are_read_like_a_technologist_would(analyzer, name, subtype):
    r = analyzer.analyze_images([SAMPLES / name])[0]
    assert r.error is None
    assert r.counts["RBC"] >= 5
    wbcs = [c for c in r.cells if c.group == "WBC"]
    assert wbcs, "every BCCD sample field holds a WBC"
    assert max(wbcs, key=lambda c: c.score).label == subtype
    assert all(0 <= c.box[0] < c.box[2] <= r.width + 1 and 0 <= c.box[1] < c.box[3] <= r.height + 1 for c in r.cells)


def test_both_runtimes_count_the_sample_fields_alike(analyzer):
    """The default runtime (onnx: every shipped folder's weights.onnx) gives torch's counts, field by field."""
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    parts = (analyzer.detector, analyzer.classifier, analyzer.classifier.refiner, analyzer.classifier.subtyper,
             analyzer.morphology.model)
    assert [m.runtime for m in parts] == ["onnx"] * 5  # shipped with current ONNX weights: no fallback
    torch = Analyzer(PipelineConfig(runtime="torch"))
    assert torch.detector.runtime == torch.classifier.runtime == "torch"
    fields = sorted(SAMPLES.glob("*.jpg"))
    for a, b in zip(analyzer.analyze_images(fields), torch.analyze_images(fields)):
        assert a.counts == b.counts, a.image
        assert [c.label for c in a.cells] == [c.label for c in b.cells]
        assert np.abs(np.array([c.box for c in a.cells]) - np.array([c.box for c in b.cells])).max() <= 0.1


def test_info_json_lists_both_models():
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["detector"]["classes"] == ["RBC", "WBC", "Platelets"] and info["detector"]["imgsz"] > 0
    assert info["classifier"]["backbone"] and info["classifier"]["crop_size_px"] > 0
    assert info["detector"]["test_metrics"]["mAP50"] > 0.5
    from smear.detector.model import DEFAULT_MODEL

    card = json.loads((ROOT / "detector" / "models" / DEFAULT_MODEL / "card.json").read_text())
    assert info["detector"]["operating_thresholds"] == card["operating_thresholds"]  # what counting uses
    sub = info["classifier"]["subtyper"]
    assert sub["classes"] == ["Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil"]
    assert sub["cv_metrics"]["subtype_accuracy"] > 0.5 and info["classifier"]["refiner"]["crop_size_px"] > 0


def test_readme_command_runs_as_a_subprocess(tmp_path):
    """The README's first command, minus the install: the real console script on a shipped sample."""
    exe = Path(sys.executable).parent / "smear"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "smear.pipeline.cli"]
    out = subprocess.run(cmd + ["analyze", str(SAMPLES / "BloodImage_00007.jpg"), "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "runtime onnx" not in out.stderr  # the shipped folders run on the default runtime, no fallback
    assert "BloodImage_00007.jpg" in out.stdout
    for name in ("results.jsonl", "summary.csv", "report.html"):
        assert (tmp_path / name).is_file()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 1


@pytest.mark.parametrize("labelled_as", [None, "Platelets"])
def test_audited_evaluation_ignores_only_the_listed_class_in_the_listed_image(tmp_path, labelled_as):
    """A WBC whose box is missing from the labels counts against the official AP, not the audited one.
    Boxed as a "platelet" (BCCD 00135), the audited evaluation scores that box as the WBC: the detection
    is a true positive and no platelet is missed."""
    import shutil

    import yaml

    from smear.configs.offline import ensure_offline
    from smear.detector.evaluate import evaluate_detector
    from smear.detector.model import find_detector

    ensure_offline()
    from ultralytics import YOLO

    model = YOLO(str(find_detector(None).weights), task="detect")
    yolo = tmp_path / "yolo"
    (yolo / "images" / "test").mkdir(parents=True)
    (yolo / "labels" / "test").mkdir(parents=True)
    wbc_seen = 0
    for name in ("BloodImage_00007.jpg", "BloodImage_00021.jpg"):
        shutil.copy(SAMPLES / name, yolo / "images" / "test" / name)
        r = model.predict(str(SAMPLES / name), conf=0.5, verbose=False)[0]
        lines = []
        for c, xywhn in zip(r.boxes.cls.tolist(), r.boxes.xywhn.tolist()):
            if name == "BloodImage_00021.jpg" and int(c) == 1:
                wbc_seen += 1
                if labelled_as is None:
                    continue  # the labeller missed this image's WBC
                c = 2  # or boxed it as a platelet
            lines.append(" ".join([str(int(c))] + [f"{v:.6f}" for v in xywhn]))
        (yolo / "labels" / "test" / name.replace(".jpg", ".txt")).write_text("\n".join(lines) + "\n")
    assert wbc_seen == 1
    (yolo / "data.yaml").write_text(yaml.safe_dump({"path": str(yolo), "train": "images/test", "val": "images/test",
                                                    "test": "images/test", "names": {0: "RBC", 1: "WBC", 2: "Platelets"}}))
    (yolo / "incomplete_labels.csv").write_text("image,split,class,reason\nBloodImage_00021,test,WBC,missed\n")
    m = evaluate_detector(None, split="test", data=yolo / "data.yaml", output=tmp_path / "eval")
    a = m["audited"]
    assert a["ignored"] == {"BloodImage_00021": ["WBC"]}
    assert m["per_class"]["WBC"]["precision"] < 0.75 < a["per_class"]["WBC"]["precision"]
    assert m["per_class"]["WBC"]["AP50"] < a["per_class"]["WBC"]["AP50"]
    if labelled_as == "Platelets":
        assert a["per_class"]["WBC"]["recall"] == 1.0  # the "platelet" box is the WBC, and it was found
        assert m["per_class"]["Platelets"]["recall"] < a["per_class"]["Platelets"]["recall"]
    for c in ("RBC",) if labelled_as else ("RBC", "Platelets"):  # untouched (P and R at one shared confidence)
        assert (a["per_class"][c]["AP50"], a["per_class"][c]["AP50_95"]) == \
            (m["per_class"][c]["AP50"], m["per_class"][c]["AP50_95"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["audited"] == a


def test_onnx_export_finds_the_same_cells_with_the_same_operating_point(tmp_path):
    """'smear detector export' writes a model folder that runs like the .pt it came from."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from smear.configs.errors import SmearError
    from smear.data.images import read_image
    from smear.detector.export import export_detector
    from smear.detector.predict import Detector
    from smear.pipeline.config import PipelineConfig

    folder = export_detector(None, "onnx", tmp_path / "onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "weights.onnx"]
    torch_det, onnx_det = Detector(None), Detector(folder)
    assert onnx_det.info.weights.suffix == ".onnx" and onnx_det.imgsz == torch_det.imgsz
    assert PipelineConfig().for_detector(onnx_det.info.card) == PipelineConfig().for_detector(torch_det.info.card)
    images = [read_image(SAMPLES / n) for n in ("BloodImage_00007.jpg", "BloodImage_00041.jpg")]
    for a, b in zip(torch_det.predict(images, conf=0.4), onnx_det.predict(images, conf=0.4)):
        assert len(a) == len(b) > 5
        order_a, order_b = np.lexsort(a.boxes.T[::-1]), np.lexsort(b.boxes.T[::-1])
        assert (a.classes[order_a] == b.classes[order_b]).all()
        assert np.abs(a.boxes[order_a] - b.boxes[order_b]).max() < 1.0  # px
    with pytest.raises(SmearError, match="exists"):
        export_detector(None, "onnx", folder)


def test_pseudo_labels_restore_the_cells_a_labeller_skipped_and_only_those(tmp_path):
    """The training split gets the confident detections no label covers; nothing is boxed twice."""
    import shutil

    from smear.configs.errors import SmearError
    from smear.data.formats import yolo_lines
    from smear.data.images import read_image
    from smear.data.pointlabels import pseudo_label_split, read_yolo_boxes
    from smear.detector.predict import Detector

    det = Detector(None)
    yolo = tmp_path / "yolo"
    names = ("BloodImage_00007.jpg", "BloodImage_00021.jpg")
    expected = {}
    for name in names:
        (yolo / "images" / "train").mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / "train").mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / name, yolo / "images" / "train" / name)
        img = read_image(SAMPLES / name)
        found = det.predict([img], conf={"RBC": 0.5, "WBC": 0.8, "Platelets": 2.0})[0]
        h, w = img.shape[:2]
        keep = np.ones(len(found), bool)
        if name == names[1]:
            keep[np.flatnonzero(found.classes == 0)[:3]] = False  # the labeller skipped three RBCs here
        lines = yolo_lines(found.boxes[keep], found.classes[keep], (w, h))
        (yolo / "labels" / "train" / name.replace(".jpg", ".txt")).write_text("\n".join(lines) + "\n")
        expected[name] = (int(keep.sum()), int((~keep).sum()), found.boxes[~keep])
    propose = lambda rgb, k: det.predict([rgb], conf=0.5, scale=k)[0]  # noqa: E731
    rows = {r["image"]: r for r in pseudo_label_split(yolo, propose, "train")}
    for name, (n_labelled, n_skipped, skipped) in expected.items():
        assert rows[name]["labelled"] == n_labelled
        assert rows[name]["pseudo_RBC"] == n_skipped and rows[name]["pseudo_WBC"] == rows[name]["pseudo_Platelets"] == 0
        boxes, classes = read_yolo_boxes(yolo / "labels" / "train" / name.replace(".jpg", ".txt"), (640, 480))
        assert len(boxes) == n_labelled + n_skipped
        if n_skipped:
            assert np.abs(boxes[-n_skipped:] - skipped).max() < 1.0 and (classes[-n_skipped:] == 0).all()
    assert (yolo / "pseudo_labels_train.csv").is_file()
    with pytest.raises(SmearError, match="training split only"):
        pseudo_label_split(yolo, propose, "val")


@pytest.mark.parametrize("factor", [4.0, 0.5])
def test_auto_scale_counts_a_resized_field_like_the_native_one(analyzer, tmp_path, factor):
    """A field at 4x or 0.5x its pixel size gives the same counts (within 10%), and the record says the scale."""
    import cv2

    from smear.data.images import read_image

    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    native = analyzer.analyze_arrays([img], ["native"])[0]
    big = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    got = analyzer.analyze_arrays([big], ["resized"])[0]
    assert native.scale == 1.0 and got.scale == pytest.approx(native.scale / factor, rel=0.15)
    for group in ("RBC", "WBC"):
        n, g = native.counts[group], got.counts[group]
        assert abs(g - n) <= max(1, 0.1 * n), (group, n, g)
    assert got.rbc_diameter_px == pytest.approx(factor * native.rbc_diameter_px, rel=0.15)
    record = got.to_dict()
    assert record["scale"] == got.scale and record["warnings"] == []


def test_a_field_where_no_scale_finds_cells_is_a_warning_not_a_silent_zero(analyzer, caplog):
    blank = np.full((480, 640, 3), 235, np.uint8)
    with caplog.at_level("WARNING"):
        r = analyzer.analyze_arrays([blank], ["blank.png"])[0]
    assert r.counts["RBC"] == 0 and len(r.warnings) == 1 and "no scale" in r.warnings[0]
    assert r.to_dict()["warnings"] == r.warnings
    assert any("blank.png" in m and "no scale" in m for m in caplog.messages)


def test_rbc_rescue_adds_only_rbcs_under_the_threshold_where_red_cell_pixels_were_uncovered():
    """The README's field, where the shipped detector leaves touching RBCs unboxed: with rbc_rescue every added cell is
    an RBC box scored under the RBC threshold and marked so, WBCs and platelets are as without, and the field's
    red-cell pixels are more completely covered."""
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    def run(on: bool):
        cfg = PipelineConfig(morphology_weights="none", rbc_rescue=on)
        return Analyzer(cfg).analyze_images([SAMPLES / "BloodImage_00007.jpg"])[0], cfg.thresholds()

    (off, _), (on, thresholds) = run(False), run(True)
    extra = [c for c in on.cells if c.detector.get("below_threshold")]
    assert extra and len(on.cells) == len(off.cells) + len(extra)
    assert all(c.detector["label"] == "RBC" and c.detector["score"] < thresholds["RBC"] for c in extra)
    assert not any(c.detector.get("below_threshold") for c in off.cells if c.detector["label"] == "RBC")
    for g in ("WBC", "Platelets"):
        assert sum(c.detector["label"] == g for c in on.cells) == sum(c.detector["label"] == g for c in off.cells)
    assert on.rbc_coverage > off.rbc_coverage
