"""``smear annotate``: VOC / YOLO / COCO pre-annotations of drawn fields, safe re-runs, round trip to training data."""

from __future__ import annotations

import csv
import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import pytest
from conftest import AnalyzerBuilt, draw_field

from smear.configs.errors import SmearError
from smear.data.config import DataConfig
from smear.data.formats import read_source
from smear.data.images import read_image
from smear.data.prepare import prepare_dataset
from smear.data.taxonomy import SUBTYPES
from smear.pipeline import annotate as annotate_module
from smear.pipeline.annotate import (
    COCO_NAME,
    LABEL_SETS,
    MANIFEST_NAME,
    YOLO_CLASSES_NAME,
    AnnotateSummary,
    annotate_folder,
)
from smear.pipeline.results import Cell, ImageResult

WBC_SUBTYPE = "Lymphocyte"


class FakeAnalyzer:
    """Stands in for ``Analyzer``: the drawn boxes of each field as cells, the WBC as a Lymphocyte."""

    class cfg:  # noqa: N801  read like a PipelineConfig
        batch = 2

    def __init__(self, raise_on: str | None = None):
        self.seen: list[str] = []
        self.raise_on = raise_on

    def info(self) -> dict:
        return {"detector": {"weights": "fake/detector.pt", "commit": "abc123"},
                "classifier": {"weights": "fake/classifier", "commit": "def456"}}

    def analyze_images(self, paths, on_result=None, progress=False):
        out = []
        for p in paths:
            if self.raise_on and Path(p).name == self.raise_on:
                raise RuntimeError("detector crashed")
            self.seen.append(Path(p).name)
            try:
                img = read_image(p)
            except SmearError as e:
                out.append(ImageResult(image=str(p), error=str(e)))
                continue
            seed = int(Path(p).stem.split("_")[-1])
            cells = []
            for group, (x1, y1, x2, y2) in _drawn(seed)[1]:
                label = WBC_SUBTYPE if group == "WBC" else group
                cells.append(Cell(box=[x1 - 0.4, y1 + 0.3, x2 + 0.2, y2], group=group, label=label, score=0.9,
                                  detector={"label": group, "score": 0.95}, classifier={"label": label, "score": 0.9}))
            out.append(ImageResult(image=str(p), width=int(img.shape[1]), height=int(img.shape[0]), cells=cells))
        return out


def _drawn(seed: int):
    return draw_field(seed=seed, size=(320, 240), n_rbc=5)


def _write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img, _ = _drawn(seed)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def _slides(root: Path, broken: bool = False) -> Path:
    """Two slides with a same-named field each, plus a PNG; optionally a garbage .jpg."""
    _write_image(root / "slideA" / "field_1.jpg", 1)
    _write_image(root / "slideA" / "field_2.png", 2)
    _write_image(root / "slideB" / "field_1.jpg", 3)  # same name as slideA's, other slide
    if broken:
        (root / "slideB" / "broken_9.jpg").write_bytes(b"this is not a jpeg" * 10)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(out: Path) -> list[dict]:
    with open(out / MANIFEST_NAME, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def slides(tmp_path) -> Path:
    return _slides(tmp_path / "slides")


def test_voc_nested_folders_parse_back_and_broken_image_is_reported(tmp_path):
    root = _slides(tmp_path / "slides", broken=True)
    fake = FakeAnalyzer()
    summary = annotate_folder(root, None, format="voc", analyzer=fake, progress=False)
    out = root / "annotations"
    assert sorted(Path(p).name for p in summary.annotated) == ["field_1.jpg", "field_1.jpg", "field_2.png"]
    assert len(summary.failed) == 1 and "broken_9.jpg" in summary.failed[0] and ": " in summary.failed[0]
    assert "broken_9.jpg" in summary.text()
    assert sorted(_files(out)) == [MANIFEST_NAME, "slideA/field_1.xml", "slideA/field_2.xml", "slideB/field_1.xml"]
    rootA = ET.parse(out / "slideA" / "field_1.xml").getroot()
    assert rootA.findtext("folder") == "slideA" and rootA.findtext("filename") == "field_1.jpg"
    assert Path(rootA.findtext("path")) == (root / "slideA" / "field_1.jpg").resolve()
    assert (rootA.findtext("size/width"), rootA.findtext("size/height"), rootA.findtext("size/depth")) == ("320", "240", "3")
    objects = rootA.findall("object")
    assert {o.findtext("name") for o in objects} == {"RBC", "WBC", "Platelets"}
    for o in objects:
        assert [c.tag for c in o] == ["name", "pose", "truncated", "difficult", "bndbox", "score"]
        xmin, ymin, xmax, ymax = (int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert 0 <= xmin < xmax <= 320 and 0 <= ymin < ymax <= 240
        assert float(o.findtext("score")) == pytest.approx(0.9)
    assert summary.cells_per_class["WBC"] == 3 and summary.cells_per_class["RBC"] == 15
    rows = _manifest(out)
    assert [r["image"] for r in rows] == ["slideA/field_1.jpg", "slideA/field_2.png", "slideB/field_1.jpg"]
    for r in rows:
        assert r["sha256"] == hashlib.sha256((out / r["annotation"]).read_bytes()).hexdigest()
        assert (r["detector"], r["detector_commit"], r["classifier"]) == ("fake/detector.pt", "abc123", "fake/classifier")
        assert r["time"]


def test_yolo_lines_and_classes(slides):
    out = slides.parent / "yolo_out"
    summary = annotate_folder(slides, out, format="yolo", labels="subtypes", analyzer=FakeAnalyzer(), progress=False)
    assert not summary.failed and len(summary.annotated) == 3
    classes = (out / YOLO_CLASSES_NAME).read_text().split()
    assert classes == list(LABEL_SETS["subtypes"]) == ["RBC", "Platelets", *SUBTYPES, "Erythroblast", "WBC"]
    lines = (out / "slideB" / "field_1.txt").read_text().splitlines()
    assert len(lines) == 5 + 1 + 2
    for line in lines:
        parts = line.split()
        assert len(parts) == 6
        assert 0 <= int(parts[0]) < len(classes)
        assert all(0.0 <= float(v) <= 1.0 for v in parts[1:])
    assert {classes[int(line.split()[0])] for line in lines} == {"RBC", WBC_SUBTYPE, "Platelets"}
    assert summary.cells_per_class[WBC_SUBTYPE] == 3


def test_coco_is_one_valid_file(slides):
    out = slides.parent / "coco_out"
    summary = annotate_folder(slides, out, format="coco", analyzer=FakeAnalyzer(), progress=False)
    assert not summary.failed and sorted(_files(out)) == sorted([COCO_NAME, MANIFEST_NAME])
    doc = json.loads((out / COCO_NAME).read_text())
    assert [c["name"] for c in doc["categories"]] == ["RBC", "WBC", "Platelets"]
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert [im["id"] for im in doc["images"]] == [1, 2, 3]
    assert [im["file_name"] for im in doc["images"]] == ["slideA/field_1.jpg", "slideA/field_2.png", "slideB/field_1.jpg"]
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] == pytest.approx(w * h, abs=0.1)
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3) and a["image_id"] in (1, 2, 3) and a["score"] == 0.9
    rows = _manifest(out)
    assert {r["annotation"] for r in rows} == {COCO_NAME}
    assert {r["sha256"] for r in rows} == {hashlib.sha256((out / COCO_NAME).read_bytes()).hexdigest()}
    from pycocotools.coco import COCO  # in the 'test' extra: a missing pycocotools fails here, it never skips
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(out / COCO_NAME))
    assert len(coco.getAnnIds()) == len(doc["annotations"])
    ev = COCOeval(coco, coco.loadRes(doc["annotations"]), "bbox")  # the file scored against itself: AP 1
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_second_run_changes_nothing(slides, fmt):
    out = slides.parent / f"out_{fmt}"
    annotate_folder(slides, out, format=fmt, analyzer=FakeAnalyzer(), progress=False)
    before = _files(out)
    again = FakeAnalyzer()
    summary = annotate_folder(slides, out, format=fmt, analyzer=again, progress=False)
    assert again.seen == [] and summary.annotated == [] and len(summary.skipped) == 3
    assert _files(out) == before
    # a new field is added without touching the others
    _write_image(slides / "slideB" / "field_4.jpg", 4)
    more = FakeAnalyzer()
    summary = annotate_folder(slides, out, format=fmt, analyzer=more, progress=False)
    assert more.seen == ["field_4.jpg"] and len(summary.skipped) == 3
    if fmt == "coco":
        doc = json.loads((out / COCO_NAME).read_text())
        assert [im["id"] for im in doc["images"]] == [1, 2, 3, 4]
    else:
        assert all(_files(out)[k] == v for k, v in before.items() if k != MANIFEST_NAME)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_hand_edited_file_is_kept_unless_overwrite_and_force(slides, fmt):
    out = slides.parent / f"out_{fmt}"
    annotate_folder(slides, out, format=fmt, analyzer=FakeAnalyzer(), progress=False)
    edited = out / ("slideA/field_1.xml" if fmt == "voc" else COCO_NAME)
    text = edited.read_text().replace("RBC", "Platelets", 1)
    edited.write_text(text)

    for overwrite in (False, True):
        fake = FakeAnalyzer()
        summary = annotate_folder(slides, out, format=fmt, overwrite=overwrite, analyzer=fake, progress=False)
        assert edited.read_text() == text
        assert any(p.endswith("field_1.jpg") and "slideA" in p for p in summary.protected)
        assert "protected" in summary.text()
        if fmt == "voc" and overwrite:  # smear's own files are re-annotated, the person's is not
            assert sorted(fake.seen) == ["field_1.jpg", "field_2.png"]

    with pytest.raises(SmearError, match="--force only applies"):
        annotate_folder(slides, out, format=fmt, force=True, analyzer=FakeAnalyzer(), progress=False)
    summary = annotate_folder(slides, out, format=fmt, overwrite=True, force=True, analyzer=FakeAnalyzer(),
                              progress=False)
    assert edited.read_text() != text and not summary.protected and len(summary.annotated) == 3
    assert hashlib.sha256(edited.read_bytes()).hexdigest() in {r["sha256"] for r in _manifest(out)}


def test_annotation_not_in_manifest_counts_as_a_persons(slides):
    out = slides.parent / "out"
    mine = out / "slideA" / "field_2.xml"
    mine.parent.mkdir(parents=True)
    mine.write_text("<annotation><filename>field_2.png</filename></annotation>\n")
    summary = annotate_folder(slides, out, format="voc", overwrite=True, analyzer=FakeAnalyzer(), progress=False)
    assert mine.read_text() == "<annotation><filename>field_2.png</filename></annotation>\n"
    assert [Path(p).name for p in summary.protected] == ["field_2.png"] and len(summary.annotated) == 2


def test_a_crashing_chunk_is_retried_image_by_image(slides):
    fake = FakeAnalyzer(raise_on="field_2.png")
    summary = annotate_folder(slides, None, format="voc", analyzer=fake, progress=False)
    assert len(summary.annotated) == 2
    assert len(summary.failed) == 1 and "field_2.png: RuntimeError: detector crashed" in summary.failed[0]


def test_interrupted_run_keeps_finished_work_and_resumes(slides):
    class Interrupted(FakeAnalyzer):
        def analyze_images(self, paths, on_result=None, progress=False):
            if any(Path(p).parent.name == "slideB" for p in paths):
                raise KeyboardInterrupt
            return super().analyze_images(paths)

    out = slides.parent / "out"
    with pytest.raises(KeyboardInterrupt):
        annotate_folder(slides, out, format="voc", analyzer=Interrupted(), progress=False)
    assert [r["image"] for r in _manifest(out)] == ["slideA/field_1.jpg", "slideA/field_2.png"]
    fake = FakeAnalyzer()
    summary = annotate_folder(slides, out, format="voc", analyzer=fake, progress=False)
    assert fake.seen == ["field_1.jpg"] and len(summary.skipped) == 2 and not summary.protected


def test_bad_options_say_what_is_valid(slides, tmp_path):
    with pytest.raises(SmearError, match="voc, yolo, coco"):
        annotate_folder(slides, None, format="csv", analyzer=FakeAnalyzer(), progress=False)
    with pytest.raises(SmearError, match="groups"):
        annotate_folder(slides, None, labels="cells", analyzer=FakeAnalyzer(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmearError, match="no images found"):
        annotate_folder(tmp_path / "empty", None, analyzer=FakeAnalyzer(), progress=False)
    out = tmp_path / "yolo"
    annotate_folder(slides, out, format="yolo", analyzer=FakeAnalyzer(), progress=False)
    with pytest.raises(SmearError, match="other classes"):
        annotate_folder(slides, out, format="yolo", labels="subtypes", analyzer=FakeAnalyzer(), progress=False)


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_prepare_dataset_reads_the_output_back_with_subtypes(slides, tmp_path, fmt):
    out = tmp_path / f"ann_{fmt}"
    annotate_folder(slides, out, format=fmt, labels="subtypes", analyzer=FakeAnalyzer(), progress=False)
    source = out / COCO_NAME if fmt == "coco" else out
    read = {ai.image_id: ai for ai in read_source(source, images=slides)}
    assert sorted(read) == ["slideA/field_1", "slideA/field_2", "slideB/field_1"]
    assert read["slideB/field_1"].image_path.resolve() == (slides / "slideB" / "field_1.jpg").resolve()
    assert [b.label for b in read["slideA/field_1"].boxes].count(WBC_SUBTYPE) == 1

    summary = prepare_dataset([source], tmp_path / f"prep_{fmt}", DataConfig(), images=slides)
    assert summary.images == 3 and not summary.failed_images
    assert summary.boxes_per_class == {"RBC": 15, "WBC": 3, "Platelets": 6}
    assert summary.crops_per_label[WBC_SUBTYPE] == 3 and summary.crops_per_label["WBC"] == 0


def test_groups_voc_reads_back_as_plain_wbc(slides, tmp_path):
    out = tmp_path / "ann"
    annotate_folder(slides, out, format="voc", labels="groups", analyzer=FakeAnalyzer(), progress=False)
    summary = prepare_dataset([out], tmp_path / "prep", DataConfig(), images=slides)
    assert summary.images == 3 and summary.crops_per_label["WBC"] == 3 and summary.crops_per_label[WBC_SUBTYPE] == 0


def test_cli_yolo_with_tiny_models(slides, tiny_detector, tiny_classifier, monkeypatch):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app
    from smear.pipeline.config import PipelineConfig

    monkeypatch.setattr(annotate_module, "default_config", lambda: PipelineConfig(
        detector_weights=str(tiny_detector), classifier_weights=str(tiny_classifier), morphology_weights="none"))
    out = slides.parent / "cli_out"
    runner = CliRunner()
    res = runner.invoke(app, ["annotate", str(slides), "--output", str(out), "--format", "yolo", "--conf", "0.0001"])
    assert res.exit_code == 0, res.output
    assert "3 annotated" in res.output and "0 failed" in res.output
    assert (out / YOLO_CLASSES_NAME).read_text().split() == ["RBC", "WBC", "Platelets"]
    assert len(list(out.rglob("*.txt"))) == 4
    assert all(len(line.split()) == 6 for t in out.rglob("field_*.txt") for line in t.read_text().splitlines())
    rows = _manifest(out)
    assert len(rows) == 3 and all(r["detector"].startswith(str(tiny_detector)) for r in rows)

    (slides / "slideB" / "broken_9.jpg").write_bytes(b"\x00garbage")
    res = runner.invoke(app, ["annotate", str(slides), "--output", str(out), "--format", "yolo", "--conf", "0.0001"])
    assert res.exit_code == 1
    assert "3 skipped" in res.output and "broken_9.jpg" in res.output


def test_summary_text_counts():
    s = AnnotateSummary(output=Path("out"), format="voc", labels="groups", annotated=["a"], skipped=["b", "c"],
                        failed=["d.jpg: cannot decode"], cells_per_class={"RBC": 4, "WBC": 1, "Platelets": 0})
    text = s.text()
    assert "4 image(s): 1 annotated, 2 skipped" in text and "RBC 4, WBC 1, Platelets 0" in text
    assert "d.jpg: cannot decode" in text


def test_default_analyzer_uses_one_threshold_for_every_class(slides, analyzer_thresholds):
    """--conf 0.25 pre-labels platelets from 0.25 too, not from the counting threshold class_conf gives them."""
    with pytest.raises(AnalyzerBuilt):
        annotate_folder(slides, slides.parent / "out_thr", format="yolo", conf=0.25, progress=False)
    assert analyzer_thresholds["thresholds"] == {"RBC": 0.25, "WBC": 0.25, "Platelets": 0.25}
