"""The analysis pipeline: the merge rule, an end-to-end run on tiny untrained models, outputs, slides."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import draw_field

from smear.configs.errors import SmearError
from smear.configs.loader import build_config
from smear.data.taxonomy import CELL_CLASSES, GROUPS, SUBTYPES, group_of
from smear.pipeline.analyze import Analyzer, slide_names
from smear.pipeline.config import PipelineConfig
from smear.pipeline.report import ResultWriter, format_table, render_html
from smear.pipeline.results import Cell, ImageResult

# ---------------------------------------------------------------- merge rule (no models)

class _FakeClassifier:
    classes = list(CELL_CLASSES)


def merger(**cfg) -> Analyzer:
    a = Analyzer.__new__(Analyzer)
    a.cfg = build_config(PipelineConfig, cfg)
    a.classifier = _FakeClassifier()
    a.morphology, a.morphology_diameter_px = None, None  # no morphology model
    a._group_index = {g: [i for i, c in enumerate(CELL_CLASSES) if group_of(c) == g] for g in GROUPS}
    return a


def probs(**p: float) -> np.ndarray:
    v = np.array([p.get(c, 0.0) for c in CELL_CLASSES], dtype=np.float64)
    assert abs(v.sum() - 1) < 1e-9
    return v


def merge_one(a: Analyzer, det_group: str, pr: np.ndarray, det_score: float = 0.8) -> Cell:
    (cell,) = a.merge(np.array([[10.0, 20.0, 50.0, 70.0]]), np.array([det_score]), np.array([GROUPS.index(det_group)]),
                      pr[None])
    return cell


def test_confident_classifier_overrides_detector_group():
    c = merge_one(merger(), "WBC", probs(RBC=0.95, Neutrophil=0.05))
    assert (c.group, c.label, c.review) == ("RBC", "RBC", True)
    assert c.detector == {"label": "WBC", "score": 0.8}
    assert c.classifier["label"] == "RBC" and c.classifier["score"] == 0.95
    assert c.score == pytest.approx(0.8 * 0.95, abs=1e-4)
    assert c.box == [10.0, 20.0, 50.0, 70.0]


def test_group_probability_sums_over_subtypes():
    # no single WBC class reaches 0.9, but the WBC group does
    c = merge_one(merger(), "RBC", probs(Neutrophil=0.5, Lymphocyte=0.45, RBC=0.05))
    assert (c.group, c.label, c.review) == ("WBC", "Neutrophil", True)
    assert c.classifier["score_in_group"] == pytest.approx(0.5 / 0.95, abs=1e-4)
    assert c.score == pytest.approx(0.8 * 0.95, abs=1e-4)


def test_override_at_exactly_the_threshold():
    c = merge_one(merger(), "WBC", probs(RBC=0.9, Neutrophil=0.1))
    assert c.group == "RBC"


def test_unsure_classifier_keeps_detector_group_and_labels_within_it():
    c = merge_one(merger(), "WBC", probs(RBC=0.6, Monocyte=0.25, Neutrophil=0.15))
    assert c.group == "WBC" and c.label == "Monocyte"          # best class inside the detector's group
    assert c.classifier["label"] == "RBC"                      # the classifier's own opinion stays recorded
    assert c.classifier["label_in_group"] == "Monocyte"
    assert c.review is True                                    # 0.6 for another group
    assert c.score == pytest.approx(0.8 * 0.4, abs=1e-4)


def test_agreeing_stages_no_review():
    c = merge_one(merger(), "WBC", probs(Lymphocyte=0.6, Neutrophil=0.3, RBC=0.1))
    assert (c.group, c.label, c.review) == ("WBC", "Lymphocyte", False)
    c = merge_one(merger(), "Platelets", probs(Platelets=0.7, Lymphocyte=0.3))
    assert (c.group, c.label, c.review) == ("Platelets", "Platelets", False)


def test_review_below_override():
    c = merge_one(merger(), "Platelets", probs(Lymphocyte=0.4, Neutrophil=0.3, Platelets=0.3))
    assert (c.group, c.label, c.review) == ("Platelets", "Platelets", True)   # WBC 0.7: not overriding, but doubted
    c = merge_one(merger(), "Platelets", probs(Lymphocyte=0.25, Neutrophil=0.2, Platelets=0.55))
    assert c.review is False                                                 # WBC 0.45 < review_prob 0.5


def test_thresholds_come_from_config():
    pr = probs(RBC=0.85, Basophil=0.15)
    assert merge_one(merger(), "WBC", pr).group == "WBC"
    assert merge_one(merger(group_override_prob=0.8), "WBC", pr).group == "RBC"
    pr = probs(RBC=0.3, Eosinophil=0.7)
    assert merge_one(merger(), "WBC", pr).review is False
    assert merge_one(merger(review_prob=0.25), "WBC", pr).review is True


def test_merge_many_cells_and_empty():
    a = merger()
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
    cells = a.merge(boxes, np.array([0.9, 0.4]), np.array([0, 2]),
                    np.stack([probs(RBC=1.0), probs(Platelets=0.99, RBC=0.01)]))
    assert [(c.group, c.label) for c in cells] == [("RBC", "RBC"), ("Platelets", "Platelets")]
    assert a.merge(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros((0, len(CELL_CLASSES)))) == []


class _FixedDetector:
    """Stand-in detector: the same boxes whatever the image; ``predict`` keeps those its thresholds let through and
    records what it was asked."""

    def __init__(self, boxes, scores, classes):
        from smear.detector.predict import Detections

        self.found = Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes))
        self.calls = []

    def predict(self, images, conf, iou=None, scale=1.0, measure_conf=None):
        from smear.detector.predict import keep_above

        self.calls.append((dict(conf), measure_conf))
        return [keep_above(self.found, conf) for _ in images]


def _rescuer(monkeypatch, wbc_rescue: float, wbc_prob: dict[int, float]):
    """A merger with a stand-in detector (an RBC at 0.9, a WBC at 0.5, WBC boxes at 0.1 alone, at 0.1 on the RBC and
    at 0.1 wholly inside the kept WBC, a WBC at 0.01) and a classifier giving box ``k`` the WBC probability
    ``wbc_prob[k]`` (else RBC)."""
    from smear.classifier import predict

    a = merger(wbc_rescue=wbc_rescue, rbc_rescue=False, class_conf=["RBC=0.4", "WBC=0.3", "Platelets=0.4"])
    W = GROUPS.index("WBC")
    boxes = [[0, 0, 20, 20], [40, 40, 90, 90], [100, 0, 160, 60], [1, 1, 21, 21], [0, 100, 50, 150],
             [45, 45, 65, 65]]  # the last: IoU 0.16 with the kept WBC, but all of it inside
    a.detector = _FixedDetector(boxes, [0.9, 0.5, 0.1, 0.1, 0.01, 0.1], [GROUPS.index("RBC"), W, W, W, W, W])
    a.scale = 1.0
    seen = []

    def fake_classify(model, images, boxes, batch=256):
        seen.append([b.tolist() for b in boxes[0]])
        rows = [probs(Lymphocyte=wbc_prob[k], RBC=1 - wbc_prob[k]) if k in wbc_prob else probs(RBC=1.0)
                for k in (boxes_index(bx) for bx in boxes[0])]
        return [np.stack(rows)]

    def boxes_index(bx):
        return next(k for k, b in enumerate(boxes) if list(map(float, b)) == list(map(float, bx)))

    monkeypatch.setattr(predict, "classify_fields", fake_classify)
    return a, seen


def test_wbc_rescue_keeps_a_low_scored_wbc_box_the_classifier_is_sure_of(monkeypatch):
    a, seen = _rescuer(monkeypatch, 0.9, {1: 0.99, 2: 0.95, 3: 0.99, 5: 0.99})
    (res,) = a.analyze_arrays([np.full((200, 200, 3), 200, np.uint8)], ["f.png"])
    # the detector ran down to the rescue floor, but measured the field's scale on the boxes it would have kept anyway
    assert a.detector.calls == [({"RBC": 0.4, "WBC": 0.02, "Platelets": 0.4}, 0.3)]
    # the boxes on the kept RBC and inside the kept WBC never reach the classifier; the one under the floor is
    # never found
    assert seen == [[[0, 0, 20, 20], [40, 40, 90, 90], [100, 0, 160, 60]]]
    rescued = [c for c in res.cells if c.detector.get("below_threshold")]
    assert [c.box for c in rescued] == [[100.0, 0.0, 160.0, 60.0]]
    assert rescued[0].group == "WBC" and rescued[0].review and rescued[0].detector["score"] == pytest.approx(0.1)
    assert res.counts["WBC"] == 2 and res.counts["RBC"] == 1


def test_rbc_rescue_keeps_a_low_rbc_box_only_over_red_cell_pixels_no_kept_box_covers(monkeypatch):
    """The detector runs down to 0.05 for RBCs; of the low RBC boxes, the one over an unboxed cell is kept (marked,
    not for review), the one over an already boxed cell and the one over the background are not."""
    from smear.classifier import predict
    from tests.conftest import draw_field

    image, drawn = draw_field(seed=3, n_rbc=3, n_wbc=0, n_plt=0)
    rbcs = [list(b) for g, b in drawn if g == "RBC"]
    a = merger(wbc_rescue=0.0, rbc_rescue=True, class_conf=["RBC=0.4", "WBC=0.3", "Platelets=0.4"])
    x1, y1, x2, y2 = rbcs[0]
    boxes = [rbcs[0], rbcs[2], rbcs[1], [x1 + 3, y1 + 2, x2 + 3, y2 + 2], [0, 0, 12, 12]]
    R = GROUPS.index("RBC")
    a.detector = _FixedDetector(boxes, [0.9, 0.8, 0.2, 0.3, 0.1], [R] * 5)
    a.scale = 1.0
    monkeypatch.setattr(predict, "classify_fields", lambda model, images, bxs, batch=256: [
        np.stack([probs(RBC=1.0)] * len(bxs[0]))])
    (res,) = a.analyze_arrays([image], ["f.png"])
    assert a.detector.calls == [({"RBC": 0.05, "WBC": 0.3, "Platelets": 0.4}, 0.3)]
    low = [c for c in res.cells if c.detector.get("below_threshold")]
    assert [c.box for c in low] == [list(map(float, rbcs[1]))] and not low[0].review
    assert res.counts["RBC"] == 3


def test_wbc_rescue_leaves_a_box_the_classifier_doubts_and_is_off_by_default(monkeypatch):
    a, seen = _rescuer(monkeypatch, 0.9, {1: 0.99, 2: 0.8})
    (res,) = a.analyze_arrays([np.full((200, 200, 3), 200, np.uint8)], ["f.png"])
    assert res.counts["WBC"] == 1 and not any(c.detector.get("below_threshold") for c in res.cells)
    off, seen = _rescuer(monkeypatch, 0.0, {1: 0.99, 2: 0.99})
    (res,) = off.analyze_arrays([np.full((200, 200, 3), 200, np.uint8)], ["f.png"])
    assert off.detector.calls == [({"RBC": 0.4, "WBC": 0.3, "Platelets": 0.4}, None)]
    assert seen == [[[0, 0, 20, 20], [40, 40, 90, 90]]] and res.counts["WBC"] == 1


# ---------------------------------------------------------------- end to end (tiny untrained models)

@pytest.fixture(scope="module")
def analyzer(tiny_detector, tiny_classifier) -> Analyzer:
    cfg = build_config(PipelineConfig, {"detector_weights": str(tiny_detector), "classifier_weights": str(tiny_classifier),
                                        "morphology_weights": "none", "conf": 0.0001, "threads": 1, "batch": 2})
    return Analyzer(cfg)


def _write_field(path: Path, seed: int) -> Path:
    img, _ = draw_field(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def run(analyzer, tmp_path_factory):
    """A field, a broken file, a second field (two batches of 2) streamed into a ResultWriter."""
    d = tmp_path_factory.mktemp("inputs")
    a = _write_field(d / "a.png", 1)
    bad = d / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    b = _write_field(d / "b.jpg", 2)
    out = tmp_path_factory.mktemp("out")
    writer = ResultWriter(out)
    streamed = []

    def on_result(result, image):
        streamed.append((result.image, image is None))
        writer.add(result, image)

    paths = [a, bad, b]
    results = analyzer.analyze_images(paths, on_result=on_result)
    for r in results:
        r.slide = "s1"
    slide = analyzer.aggregate_slide("s1", results)
    writer.close(results, [slide])
    return {"paths": paths, "results": results, "slide": slide, "out": out, "streamed": streamed}


def test_results_in_input_order_and_broken_file_reported(run):
    results = run["results"]
    assert [r.image for r in results] == [str(p) for p in run["paths"]]
    assert run["streamed"] == [(str(run["paths"][0]), False), (str(run["paths"][1]), True),
                               (str(run["paths"][2]), False)]
    bad = results[1]
    assert bad.error and "broken.jpg" in bad.error and bad.cells == [] and bad.flags == []
    for r in (results[0], results[2]):
        assert r.error is None and (r.width, r.height) == (640, 480)
        assert len(r.cells) > 0  # conf=0.0001 on an untrained model: plenty of boxes


def test_cells_counts_and_flags_consistent(run):
    r = run["results"][0]
    for c in r.cells:
        assert c.group in GROUPS and group_of(c.label) == c.group
        assert c.label in CELL_CLASSES
        assert 0 <= c.score <= 1 and len(c.box) == 4
        assert c.detector["label"] in GROUPS and c.classifier["label"] in CELL_CLASSES
    assert r.counts["WBC"] == sum(c.group == "WBC" for c in r.cells)
    assert r.counts["RBC"] == sum(c.label == "RBC" for c in r.cells)
    assert r.differential["n_wbc"] == sum(r.counts[s] for s in SUBTYPES)
    for f in r.flags:
        for key in ("name", "severity", "rule", "threshold", "observed", "evidence", "caveat"):
            assert getattr(f, key) not in (None, "")
    json.dumps(r.to_dict())  # serialisable


def test_analyze_arrays_matches_files(analyzer, run):
    img = cv2.cvtColor(cv2.imread(str(run["paths"][0])), cv2.COLOR_BGR2RGB)
    (r,) = analyzer.analyze_arrays([img], ["x"])
    assert r.counts == run["results"][0].counts


def test_slide_aggregation(run):
    s = run["slide"]
    ok = [r for r in run["results"] if not r.error]
    assert s.n_fields == 2
    for k in ("RBC", "WBC", "Platelets", *SUBTYPES):
        assert s.counts[k] == sum(r.counts[k] for r in ok)
    assert s.estimates["mean_per_field"]["RBC"] == pytest.approx(s.counts["RBC"] / 2, abs=0.01)
    d = s.to_dict()
    assert d["n_failed"] == 1 and d["images"] == [str(p) for p in run["paths"]]
    assert d["capture_mode"] == "wbc-centred"


def test_slide_estimates_with_calibration(analyzer, run):
    import dataclasses

    calibrated = Analyzer.__new__(Analyzer)
    calibrated.__dict__.update(analyzer.__dict__)
    calibrated.cfg = dataclasses.replace(analyzer.cfg, platelet_factor_per_field=15000.0, capture_mode="random",
                                         wbc_factor_per_field=2000.0, field_area_um2=5000.0)
    s = calibrated.aggregate_slide("s", run["results"])
    assert s.estimates["platelets_per_uL"] == round(s.counts["Platelets"] / 2 * 15000)
    assert s.estimates["wbc_per_uL"] == round(s.counts["WBC"] / 2 * 2000)
    assert s.estimates["per_mm2"]["RBC"] == pytest.approx(s.counts["RBC"] / 2 / 5000 * 1e6, abs=0.1)
    names = [f.name for f in s.flags]
    assert "platelet_estimate" in names and "wbc_estimate" in names  # 2 fields < 10: insufficient evidence


def test_writer_outputs(run):
    out = run["out"]
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert [r["image"] for r in records] == [str(p) for p in run["paths"]]
    assert records[1]["error"] and records[1]["cells"] == []
    assert records[0]["error"] is None and len(records[0]["cells"]) == len(run["results"][0].cells)

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(p) for p in run["paths"]]
    assert rows[1]["error"] and rows[1]["n_RBC"] == ""
    assert int(rows[0]["n_RBC"]) == run["results"][0].counts["RBC"] and rows[0]["error"] == ""

    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert overlays == ["00000_a.png", "00002_b.png"]
    ov = cv2.imread(str(out / "overlays" / "00000_a.png"))
    assert ov is not None and ov.shape == (480, 640, 3)

    slides = json.loads((out / "slides.json").read_text())
    assert slides[0]["slide"] == "s1" and slides[0]["n_fields"] == 2
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_report_html_is_self_contained(run):
    text = (run["out"] / "report.html").read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'"\s>]+)""", text, flags=re.I)
    assert refs, "expected embedded thumbnails"
    # embedded images, or links to the full-size overlays beside the report (inside the output folder)
    assert all(r.startswith(("data:", "#")) or (r.startswith("overlays/") and (run["out"] / r).is_file())
               for r in refs), refs
    assert sum(r.startswith("overlays/") for r in refs) == 2  # each field's thumbnail opens its overlay
    assert "http" not in " ".join(refs) and "<link" not in text.lower() and "<script src" not in text.lower()
    assert text.count("width='320'") == 2
    assert "broken.jpg" in text and "not a diagnosis" in text
    assert "Slide s1" in text and "smear " in text  # the header names smear's version and the models


def test_render_html_escapes_names():
    r = ImageResult(image="/data/<i>x.png", error="<b>bad</b>")
    text = render_html([r], [], None)
    assert "<i>x" not in text and "&lt;i&gt;x.png" in text and "&lt;b&gt;bad" in text


def test_flag_table_escapes_observed_values():
    from smear.pipeline.results import Flag, SlideResult

    flag = Flag("x", "warning", "rule <r>", "< 5", {"a<b": "<script>"}, {"fields": 1}, "caveat & more")
    slide = SlideResult("s", [], counts={"RBC": 0}, flags=[flag], differential={"n_wbc": 0})
    text = render_html([], [slide], None)
    assert "<script>" not in text and "a&lt;b: &lt;script&gt;" in text and "rule &lt;r&gt;" in text


def test_slide_of_failed_images_only():
    a = merger()
    results = [ImageResult(image="x.png", error="x.png: file not found")]
    s = a.aggregate_slide("s", results)
    assert s.n_fields == 0 and s.estimates == {"mean_per_field": {}}
    assert all(f.severity == "insufficient evidence" for f in s.flags)
    assert s.to_dict()["n_failed"] == 1


def test_format_table(run):
    table = format_table(run["results"]).splitlines()
    assert len(table) == 4 and table[0].startswith("image")
    assert "ERROR" in table[2] and "a.png" in table[1]


def test_a_cut_short_jpeg_is_analysed_with_a_warning_in_its_record(analyzer, tmp_path):
    f = _write_field(tmp_path / "whole.jpg", 1)
    data = f.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    whole, cut = analyzer.analyze_images([f, tmp_path / "cut.jpg"])
    assert whole.warnings == [] and cut.error is None
    assert any("truncated JPEG" in w for w in cut.warnings)


def test_slide_names_one_slide_per_subfolder(tmp_path):
    root = tmp_path / "slides"
    files = [_write_field(root / "patient1" / "f1.png", 1), _write_field(root / "patient1" / "deep" / "f2.png", 2),
             _write_field(root / "patient2" / "f3.png", 3), _write_field(root / "loose.png", 4)]
    other = _write_field(tmp_path / "elsewhere" / "x.png", 5)
    from smear.data.images import expand_inputs

    paths = expand_inputs([root, other])
    assert set(paths) == set(files) | {other}
    got = dict(zip(paths, slide_names(paths, [str(root), str(other)], None)))
    assert got[files[0]] == got[files[1]] == "patient1"
    assert got[files[2]] == "patient2"
    assert got[files[3]] == "slides"  # a field directly in the given folder: the folder is the slide
    assert got[other] == "all"
    assert slide_names(paths, [str(root)], "S9") == ["S9"] * len(paths)


def test_slide_names_follow_the_folders_the_user_named_through_symlinks(tmp_path):
    from smear.data.images import expand_inputs

    store = tmp_path / "store"
    real = [_write_field(store / f"img{i}.png", i) for i in range(2)]
    slide = tmp_path / "slides" / "patient7"
    slide.mkdir(parents=True)
    for f in real:
        (slide / f.name).symlink_to(f)  # a folder of symlinked images
    (tmp_path / "slides" / "patient8").symlink_to(store, target_is_directory=True)  # a symlinked slide folder
    paths = expand_inputs([tmp_path / "slides"])
    names = slide_names(paths, [str(tmp_path / "slides")], None)
    assert sorted(zip((p.parent.name for p in paths), names)) == [("patient7", "patient7")] * 2 + \
        [("patient8", "patient8")] * 2
    assert slide_names(expand_inputs([slide]), [str(slide)], None) == ["patient7", "patient7"]
    (slide / "loop").symlink_to(slide, target_is_directory=True)  # a symlink loop ends: each real folder once
    assert len(expand_inputs([tmp_path / "slides"])) == 4


def test_analyze_slides_end_to_end(analyzer, tmp_path):
    root = tmp_path / "slides"
    _write_field(root / "A" / "1.png", 1)
    _write_field(root / "A" / "2.png", 2)
    _write_field(root / "B" / "3.png", 3)
    from smear.data.images import expand_inputs

    paths = expand_inputs([root])
    names = slide_names(paths, [root], None)
    results = analyzer.analyze_images(paths)
    groups: dict[str, list] = {}
    for r, n in zip(results, names):
        r.slide = n
        groups.setdefault(n, []).append(r)
    slides = {n: analyzer.aggregate_slide(n, rs) for n, rs in groups.items()}
    assert set(slides) == {"A", "B"}
    assert slides["A"].n_fields == 2 and slides["B"].n_fields == 1
    assert slides["A"].counts["RBC"] == sum(r.counts["RBC"] for r in groups["A"])


def test_morphology_domain_gate_by_rbc_size():
    """RBCs far from the morphology model's training size get no morphology call and one explaining flag."""
    from smear.pipeline.analyze import SlideAggregator
    from smear.pipeline.config import PipelineConfig
    from smear.pipeline.results import Cell

    a = SlideAggregator(PipelineConfig(), morphology_diameter_px=39.0)

    def rbcs(d):
        return [Cell([0, 0, d, d], "RBC", "RBC", 0.9, {}, {}) for _ in range(5)]

    assert a._morphology_domain(rbcs(40))["in_domain"] is True
    big = a._morphology_domain(rbcs(100))
    assert big["in_domain"] is False and big["median_rbc_diameter_px"] == 100
    summary, flags = a._morphology_outputs(rbcs(100), {"RBC": 5}, 1)
    assert [f.name for f in flags] == ["rbc_morphology"] and flags[0].severity == "insufficient evidence"
    assert "no RBC morphology call" in flags[0].caveat
    a.cfg = PipelineConfig(pixel_size_um=0.1)  # a known scale overrides the size check
    assert a._morphology_domain(rbcs(100))["in_domain"] is True


# ---------------------------------------------------------------- streamed batches (flat memory)

def _synthetic_results(seed: int, n_images: int = 6, rbc_px: float = 39.0) -> list[ImageResult]:
    """Fields of random cells (groups, labels, sizes, subtype confidences, morphology calls), one failed."""
    import random

    from smear.data.taxonomy import MORPHOLOGY_CLASSES

    rng = random.Random(seed)
    labels = ["RBC"] * 16 + ["Platelets"] * 3 + list(SUBTYPES) + ["Erythroblast"]  # every label the pipeline counts
    results = []
    for i in range(n_images):
        if i == 2:
            results.append(ImageResult(image=f"f{i}.png", error=f"f{i}.png: cannot be read"))
            continue
        cells = []
        for _ in range(rng.randint(0, 40)):
            label = rng.choice(labels)
            d = rbc_px * rng.uniform(0.7, 1.3)
            x, y = round(rng.uniform(0, 600), 1), round(rng.uniform(0, 440), 1)
            morphology = None
            if label == "RBC" and rng.random() < 0.9:
                morphology = {"label": rng.choice([*MORPHOLOGY_CLASSES, "unseen_label"]), "score": 0.8}
            cells.append(Cell([x, y, round(x + d, 1), round(y + d * rng.uniform(0.9, 1.1), 1)], group_of(label), label,
                              0.9, {"label": group_of(label), "score": 0.9},
                              {"label": label, "score": 0.9, "score_in_group": round(rng.random(), 4)},
                              morphology=morphology))
        results.append(ImageResult(image=f"f{i}.png", width=640, height=480, cells=cells))
    return results


def _aggregate_all_cells_at_once(a: Analyzer, results: list[ImageResult]) -> dict:
    """The slide's counts, flags and morphology computed from every cell at once (the pre-streaming way)."""
    from smear.pipeline.analyze import mean_rbc_diameter_um
    from smear.pipeline.flags import compute_flags
    from smear.pipeline.results import count_cells, differential_from_counts

    ok = [r for r in results if not r.error]
    cells = [c for r in ok for c in r.cells]
    counts = count_cells(cells)
    unplaced = sum(1 for c in cells if c.group == "WBC" and c.classifier["score_in_group"] < a.cfg.low_confidence_wbc)
    flags = compute_flags(counts, differential_from_counts(counts), len(ok), a.cfg, unplaced,
                          mean_rbc_diameter_um(cells, a.cfg))
    morphology, extra = a._morphology_outputs(cells, counts, len(ok))
    return {"counts": counts, "differential": differential_from_counts(counts),
            "flags": [f.to_dict() for f in flags + extra], "morphology": morphology}


@pytest.mark.parametrize("seed,rbc_px,cfg", [
    (0, 39.0, {}),                                                     # morphology shares and flags
    (1, 100.0, {}),                                                    # out of the morphology model's domain
    (2, 39.0, {"pixel_size_um": 0.1, "capture_mode": "random", "wbc_factor_per_field": 2000.0,
               "platelet_factor_per_field": 15000.0, "low_confidence_wbc": 0.7}),  # RBC size, estimates
])
def test_running_slide_totals_match_all_cells_at_once(seed, rbc_px, cfg):
    from smear.pipeline.analyze import SlideTotals

    a = merger(**cfg)
    a.morphology_diameter_px = 39.0  # the morphology model's cell size: what the slide aggregate needs of it
    results = _synthetic_results(seed, rbc_px=rbc_px) + _synthetic_results(seed + 10, rbc_px=rbc_px)
    totals = SlideTotals("s", a.cfg.low_confidence_wbc)
    for r in results:
        totals.add(r)
    slide = a.slide_result(totals)
    expected = _aggregate_all_cells_at_once(a, results)
    assert slide.counts == expected["counts"] and slide.differential == expected["differential"]
    assert [f.to_dict() for f in slide.flags] == expected["flags"]
    assert slide.morphology == expected["morphology"]
    assert slide.morphology["n_rbc"] > 100 and slide.morphology["counts"]["unseen_label"] > 0
    if "pixel_size_um" in cfg:  # the flags that need the running RBC-diameter and unplaced-WBC totals
        assert {"microcytosis_pattern", "unplaced_wbc"} <= {f.name for f in slide.flags}
    # the fields are listed, without their cells
    assert [r.image for r in slide.images] == [r.image for r in results]
    assert all(r.cells == [] for r in slide.images) and slide.n_fields == len(results) - 2
    assert slide.to_dict() == a.aggregate_slide("s", results).to_dict()


def test_analyze_batch_keeps_no_result_and_matches_whole_list(analyzer, tmp_path):
    import gc
    import weakref

    paths = [_write_field(tmp_path / "A" / "1.png", 1), tmp_path / "A" / "missing.png",
             _write_field(tmp_path / "B" / "2.png", 2), _write_field(tmp_path / "A" / "3.png", 3)]
    slides_of = ["A", "A", "B", "A"]
    alive, images, records = [], [], []

    def on_result(result, image):
        alive.append(weakref.ref(result))
        images.append(image is not None)
        records.append(result.to_dict())

    batch = analyzer.analyze_batch(paths, slides_of, on_result=on_result)
    gc.collect()
    # Nothing but the failed field's record outlives its callback: no cells are kept over the batch.
    assert [ref() is not None for ref in alive] == [False, True, False, False]
    assert [r.image for r in batch.failed] == [str(paths[1])] and batch.n_images == 4
    assert images == [True, False, True, True]
    assert [r["slide"] for r in records] == slides_of

    whole = analyzer.analyze_images(paths)
    for r, s in zip(whole, slides_of):
        r.slide = s
    expected = [analyzer.aggregate_slide(n, [r for r in whole if r.slide == n]).to_dict() for n in ("A", "B")]
    assert [s.to_dict() for s in batch.slides] == expected
    assert [r.to_dict() for r in whole] == records

    with pytest.raises(SmearError, match="one slide name per path"):
        analyzer.analyze_batch(paths, ["A"])


def test_streamed_writer_outputs_equal_whole_list_views(run):
    """summary.csv and report.html written as results came equal the views built from the whole list."""
    import dataclasses

    from smear.pipeline.report import write_summary_csv

    out = run["out"]
    # the fixture names the slide after streaming: the whole-list view sees the records as they were added
    as_added = [dataclasses.replace(r, slide=None) for r in run["results"]]
    assert (out / "report.html").read_text() == render_html(as_added, [run["slide"]], out / "overlays")
    # the fixture names the slide after streaming: rows carry what each record was when added
    write_summary_csv(out / "whole.csv", [dataclasses.replace(r, slide=None) for r in run["results"]])
    assert (out / "summary.csv").read_bytes() == (out / "whole.csv").read_bytes()


def test_report_header_wbc_gallery_and_slides_csv(tmp_path):
    """The report names the run (date, version, models), shows each slide's WBCs by class once, links each
    thumbnail to its full-size overlay; slides.csv has one row per slide."""
    import cv2

    from smear.pipeline.results import Flag, SlideResult, differential_from_counts

    img, boxes = draw_field(seed=3, n_wbc=2)
    path = tmp_path / "f.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cells = [Cell(list(b), "WBC" if lab == "WBC" else lab, "Lymphocyte" if lab == "WBC" else lab, 0.9, {},
                  {"score_in_group": 0.8}) for lab, b in boxes]
    result = ImageResult(image=str(path), width=640, height=480, cells=cells, slide="s9",
                         counts={"Lymphocyte": 2, "WBC": 2}, warnings=["a field warning"])
    writer = ResultWriter(tmp_path / "out", run_info={"date": "2026-12-01T10:00:00", "smear": "0.1.0", "commit": "abc",
                                                      "models": {"detector": {"weights": "/m/det-x/weights.pt"},
                                                                 "classifier": {"weights": "/m/cls-y"}}})
    writer.add(result, img)
    slide = SlideResult("s9", [result], counts={"Lymphocyte": 2, "WBC": 2}, ratios={"platelets_per_1000_rbc": None},
                        differential=differential_from_counts({"Lymphocyte": 2}),
                        flags=[Flag("differential", "insufficient evidence", "r", "t", "o", {"fields": 1}, "c")])
    writer.close(slides=[slide])
    text = (tmp_path / "out" / "report.html").read_text()
    assert "smear report: slide s9" in text and "Analysed 2026-12-01T10:00:00; smear 0.1.0 (abc)" in text
    assert "detector: weights.pt" in text or "detector: det-x" in text
    assert "<h4>Lymphocyte (2)</h4>" in text and text.count("width:72px") <= 1
    assert "overlays/00000_f.png" in text and "a field warning" in text
    assert text.count("differential (insufficient evidence)") == 0  # flags are in the slide's table, not per field
    with open(tmp_path / "out" / "slides.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["slide"] == "s9" and row["n_Lymphocyte"] == "2" and row["pct_Lymphocyte"] == "100.0"
    assert row["flags"] == "differential (insufficient evidence)"


def test_writer_first_file_failed_and_close_checks(tmp_path):
    from smear.pipeline.results import SlideResult

    good = ImageResult(image="b.png", width=4, height=4, counts={"RBC": 2, "Platelets": 1},
                       ratios={"platelets_per_1000_rbc": 500.0, "wbc_per_1000_rbc": 0.0})
    writer = ResultWriter(tmp_path / "out")
    writer.add(ImageResult(image="a.png", error="a.png: cannot be read"))
    writer.add(good)
    writer.close(slides=[SlideResult("s", [])])
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["platelets_per_1000_rbc"] == "" and rows[1]["platelets_per_1000_rbc"] == "500.0"
    text = (tmp_path / "out" / "report.html").read_text()
    assert "<p>2 images, 1 slide(s), 1 failed.</p>" in text and text.endswith("</html>")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "results.jsonl", "slides.csv",
                                                                     "slides.json", "summary.csv"]

    writer = ResultWriter(tmp_path / "out2")
    writer.add(good)
    with pytest.raises(SmearError, match="2 results but add"):
        writer.close([good, good], [])


def test_classifier_sees_bounded_batch_shapes(analyzer, run):
    """Crops go to the classifier in chunks of CLASSIFIER_BATCH, so few input shapes are ever built (memory)."""
    from smear.pipeline.analyze import CLASSIFIER_BATCH

    sizes = []
    hook = analyzer.classifier.net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        (r,) = analyzer.analyze_images([run["paths"][0]])
    finally:
        hook.remove()
    assert len(r.cells) > CLASSIFIER_BATCH  # conf=0.0001 on an untrained model: plenty of boxes
    assert max(sizes) == CLASSIFIER_BATCH and sum(sizes) == len(r.cells)


def test_rbc_fragments_on_the_field_border_are_not_counted(analyzer):
    """A sliver of an RBC at the field edge (centre outside) is left to the neighbouring field."""
    import copy
    from dataclasses import replace

    from smear.detector.predict import Detections

    inner = [[100, 100, 140, 140], [200, 100, 240, 140], [300, 100, 340, 140]]
    sliver, half_in = [0, 300, 12, 340], [0, 400, 28, 440]  # 12 px and 28 px of a 40 px cell inside

    class _Stub:
        def predict(self, images, **kw):
            b = np.array(inner + [sliver, half_in], np.float32)
            return [Detections(b, np.full(len(b), 0.9, np.float32), np.zeros(len(b), np.int64)) for _ in images]

    field = np.full((480, 640, 3), 200, np.uint8)
    a = copy.copy(analyzer)
    a.detector = _Stub()
    a.cfg = replace(analyzer.cfg, edge_fragment_min=0.5)
    (res,) = a.analyze_arrays([field], ["f.png"])
    assert sorted(c.box for c in res.cells) == sorted(inner + [half_in])
    a.cfg = replace(analyzer.cfg, edge_fragment_min=0.0)
    (res,) = a.analyze_arrays([field], ["f.png"])
    assert len(res.cells) == 5
