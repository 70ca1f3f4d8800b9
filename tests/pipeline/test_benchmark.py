"""smear benchmark: matching, AP, outcomes, and one end-to-end run with a stand-in analyzer (no models)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_voc

from smear.configs.errors import SmearError
from smear.data.boxes import iou_matrix
from smear.data.config import DataConfig
from smear.data.taxonomy import GROUPS, SUBTYPES, group_of
from smear.pipeline.benchmark import (
    OUTCOMES,
    average_precision,
    cell_metrics,
    detection_ap,
    load_ground_truth,
    match_greedy,
    match_image_cells,
    run_benchmark,
)
from smear.pipeline.config import PipelineConfig
from smear.pipeline.results import Cell, ImageResult

TRUTH = [((10, 10, 50, 50), "RBC"), ((100, 100, 160, 160), "Neutrophil"), ((200, 10, 215, 25), "Platelets")]


def cell(box, det_label, final_group, det_score=0.9, final_label=None, cls_label=None, prob=0.95) -> Cell:
    final_label = final_label or ("Neutrophil" if final_group == "WBC" else final_group)
    return Cell(box=list(map(float, box)), group=final_group, label=final_label, score=round(det_score * prob, 4),
                detector={"label": det_label, "score": det_score},
                classifier={"label": cls_label or final_label, "score": prob, "label_in_group": final_label})


def rows_of(cells, truth=TRUTH):
    return match_image_cells("img", truth, cells)


# ---------------------------------------------------------------- matching and AP

def test_iou_matrix_and_greedy_matching_highest_score_first():
    truth = np.array([[0, 0, 10, 10]], float)
    preds = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float)
    ious = iou_matrix(preds, truth)
    assert ious[0, 0] == pytest.approx(1.0)
    assert ious[1, 0] == pytest.approx(90 / 110)
    # the second box scores higher, so it takes the only true box although the first fits better
    assert match_greedy([0.5, 0.9], ious).tolist() == [-1, 0]
    assert match_greedy([0.9, 0.5], ious).tolist() == [0, -1]
    assert match_greedy([0.9, 0.5], ious, iou_threshold=0.95).tolist() == [0, -1]
    assert match_greedy([0.5, 0.9], ious, iou_threshold=0.95).tolist() == [0, -1]


def test_average_precision_hand_made():
    assert average_precision([0.9, 0.8, 0.7], [True, True, True], 3) == pytest.approx(1.0)
    # one of three never found: precision 1 up to recall 2/3, then nothing (COCO 101 points: 0..0.66)
    assert average_precision([0.9, 0.8], [True, True], 3) == pytest.approx(67 / 101)
    # a false detection ranked above the only true one: precision 0.5 at every recall
    assert average_precision([0.9, 0.8], [False, True], 1) == pytest.approx(0.5)
    assert average_precision([0.9, 0.8], [True, False], 1) == pytest.approx(1.0)
    assert average_precision([], [], 2) == 0.0
    assert average_precision([0.5], [False], 0) is None


def test_detection_ap_perfect_predictions_per_class():
    boxes = [t[0] for t in TRUTH]
    labels = [group_of(t[1]) for t in TRUTH]
    ap = detection_ap(["a"] * 3, boxes, labels, [0.9, 0.8, 0.7], ["a"] * 3, boxes, labels)
    assert all(v == pytest.approx(1.0) for c in GROUPS for v in ap[c])
    # a box shifted by 9 px (IoU 1240 / 1960 = 0.63) counts at IoU 0.50, 0.55 and 0.60 only
    shifted = [(19, 10, 59, 50)]
    ap = detection_ap(["a"], shifted, ["RBC"], [0.9], ["a"], [TRUTH[0][0]], ["RBC"], classes=("RBC",))
    assert [v for v in ap["RBC"]] == pytest.approx([1.0] * 3 + [0.0] * 7)
    # right box, wrong class: nothing for either class; a class with no true cells has no AP
    ap = detection_ap(["a"], [TRUTH[0][0]], ["WBC"], [0.9], ["a"], [TRUTH[0][0]], ["RBC"])
    assert ap["RBC"][0] == 0.0 and ap["WBC"][0] is None


def test_detection_ap_agrees_with_pycocotools():
    """Same AP as COCOeval (bbox, all areas, 100 detections) on random jittered boxes with misses and extras."""
    from pycocotools.coco import COCO  # in the 'test' extra: a missing pycocotools fails here, it never skips
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    classes = ("RBC", "WBC", "Platelets")
    ti, tb, tl, pi, pb, pl, ps = [], [], [], [], [], [], []
    for img in range(6):
        for _ in range(12):
            x, y, w = rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(15, 80)
            label = classes[rng.integers(3)]
            ti.append(img), tb.append([x, y, x + w, y + w]), tl.append(label)
            for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 detections, jittered, sometimes the wrong class
                j = rng.normal(0, w * 0.12, 4)
                pi.append(img), pb.append([x + j[0], y + j[1], x + w + j[2], y + w + j[3]])
                pl.append(label if rng.random() > 0.15 else classes[rng.integers(3)])
                ps.append(float(rng.uniform(0.05, 1.0)))
    ap = detection_ap(pi, np.array(pb), pl, ps, ti, np.array(tb), tl)
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1, "width": 640, "height": 480} for i in range(6)],
                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
                  "annotations": [{"id": n + 1, "image_id": i + 1, "category_id": classes.index(c) + 1, "iscrowd": 0,
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                   "area": (b[2] - b[0]) * (b[3] - b[1])} for n, (i, b, c) in enumerate(zip(ti, tb, tl))]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": i + 1, "category_id": classes.index(c) + 1, "score": sc,
                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for i, b, c, sc in zip(pi, pb, pl, ps)])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, 2]  # (iou, recall, class), all areas, 100 detections
    for k, c in enumerate(classes):
        assert ap[c] == pytest.approx(list(precision[:, :, k].mean(1)), abs=1e-9), c


# ---------------------------------------------------------------- outcomes

def test_outcomes_correct_missed_recall_two_thirds():
    rows = rows_of([cell(TRUTH[0][0], "RBC", "RBC"), cell(TRUTH[1][0], "WBC", "WBC", 0.8)])
    assert [r["outcome"] for r in rows] == ["correct", "correct", "missed"]
    assert rows[1]["subtype_outcome"] == "correct" and rows[0]["subtype_outcome"] == ""
    m = cell_metrics(pd.DataFrame(rows), "pipeline")
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["precision"] == 1.0
    assert m["per_class"]["Platelets"]["fn"] == 1
    assert m["confusion_matrix"]["matrix"][2] == [0, 0, 0, 1]  # Platelets row: one to background


def test_outcome_duplicate_and_false_detection():
    rows = rows_of([cell(TRUTH[0][0], "RBC", "RBC", 0.9), cell((11, 10, 51, 50), "RBC", "RBC", 0.6),
                    cell((400, 400, 440, 440), "RBC", "RBC", 0.7)], truth=TRUTH[:1])
    assert [r["outcome"] for r in rows] == ["correct", "duplicate", "false_detection"]
    assert rows[1]["detector_score"] == 0.6  # the lower-scored copy is the duplicate
    m = cell_metrics(pd.DataFrame(rows), "detector")
    assert m["per_class"]["RBC"] == {"tp": 1, "fp": 2, "fn": 0, "precision": pytest.approx(1 / 3, abs=1e-4),
                                     "recall": 1.0, "F1": 0.5}
    assert m["confusion_matrix"]["matrix"][3] == [2, 0, 0, 0]  # background row


def test_outcomes_classifier_fix_break_and_both_wrong():
    truth = TRUTH + [((300, 300, 340, 340), "RBC")]
    rows = rows_of([cell(TRUTH[0][0], "Platelets", "RBC"),  # detector wrong, classifier fixes
                    cell(TRUTH[1][0], "WBC", "WBC", final_label="Lymphocyte"),  # group right, subtype wrong
                    cell(TRUTH[2][0], "Platelets", "RBC"),  # detector right, classifier breaks it
                    cell((300, 300, 340, 340), "WBC", "Platelets")], truth=truth)  # both wrong
    assert [r["outcome"] for r in rows] == ["detector_wrong_corrected_by_classifier", "correct",
                                            "classifier_broke_correct_detection", "both_wrong"]
    assert rows[1]["subtype_outcome"] == "wrong_subtype"
    df = pd.DataFrame(rows)
    det, pipe = cell_metrics(df, "detector"), cell_metrics(df, "pipeline")
    assert det["per_class"]["RBC"]["tp"] == 0 and pipe["per_class"]["RBC"]["tp"] == 1
    assert det["per_class"]["Platelets"]["tp"] == 1 and pipe["per_class"]["Platelets"]["tp"] == 0
    assert pipe["subtype"]["accuracy"] == 0.0 and pipe["subtype"]["n_matched"] == 1


def test_class_agnostic_pairs_wrong_group_for_subtype():
    rows = rows_of([cell(TRUTH[1][0], "WBC", "RBC")], truth=TRUTH[1:2])
    assert rows[0]["outcome"] == "classifier_broke_correct_detection"
    assert rows[0]["subtype_outcome"] == "wrong_group"


# ---------------------------------------------------------------- end to end

def _free_box(boxes, size=(640, 480), side=30):
    for y in range(0, size[1] - side, 10):
        for x in range(0, size[0] - side, 10):
            b = np.array([[x, y, x + side, y + side]], float)
            if not len(boxes) or iou_matrix(b, np.array(boxes, float)).max() == 0:
                return [float(v) for v in b[0]]
    raise AssertionError("no free spot")


class FakeAnalyzer:
    """Stands in for Analyzer: cells made from the ground truth with known errors in each image.

    Per image: true cell 0 missed (found only below the operating threshold), 1 detector wrong and
    fixed by the classifier, 2 broken by the classifier, 3 wrong in both, a duplicate of 4 and one
    false detection; the rest correct with 1 px jitter, and one wrong WBC subtype in the first image.
    """

    def __init__(self, truth):
        self.truth = {str(a.image_path): a for a in truth}
        self.calls = 0

    def analyze_images(self, paths, progress=False):
        self.calls += 1
        out = []
        for k, p in enumerate(paths):
            ai = self.truth[str(p)]
            cells = []
            for i, b in enumerate(ai.boxes):
                g = group_of(b.label)
                box = [b.x1 + 1, b.y1 - 1, b.x2 + 1, b.y2 - 1]
                score = 0.95 - 0.01 * i
                subtype = b.label if b.label in SUBTYPES else "Neutrophil"
                if k == 0 and g == "WBC":
                    subtype = "Basophil" if subtype != "Basophil" else "Monocyte"
                final_label = subtype if g == "WBC" else g
                wrong = "WBC" if g != "WBC" else "RBC"
                if i == 0:
                    cells.append(cell(box, g, g, 0.1, final_label))
                elif i == 1:
                    cells.append(cell(box, wrong, g, score, final_label))
                elif i == 2:
                    cells.append(cell(box, g, wrong, score, "Eosinophil" if wrong == "WBC" else wrong))
                elif i == 3:
                    other = next(x for x in GROUPS if x not in (g, wrong))
                    cells.append(cell(box, wrong, other, score, "Eosinophil" if other == "WBC" else other))
                else:
                    cells.append(cell(box, g, g, score, final_label))
                if i == 4:
                    cells.append(cell([v + 3 for v in box], g, g, 0.3, final_label))
            cells.append(cell(_free_box([x.xyxy for x in ai.boxes]), "Platelets", "Platelets", 0.5))
            cells.append(cell(_free_box([x.xyxy for x in ai.boxes] + [cells[-1].box]), "RBC", "RBC", 0.05))
            out.append(ImageResult(image=str(p), width=ai.width, height=ai.height, cells=cells))
        return out


def _voc_with_subtypes(tmp_path, categories: str):
    """A 12-image drawn VOC set (test: images 9-11), its subtype table and the test split's ground truth."""
    voc = write_voc(tmp_path / "voc", n_images=12)
    subtypes = tmp_path / "wbc_subtypes.csv"
    subtypes.write_text(",Image,Category\n" + categories)
    data_cfg = DataConfig(subtypes_csv=str(subtypes))
    return voc, data_cfg, load_ground_truth(voc, "test", data_cfg)[1]


@pytest.fixture
def bench(tmp_path):
    voc, data_cfg, truth = _voc_with_subtypes(tmp_path, ",9,NEUTROPHIL\n,10,LYMPHOCYTE\n,11,\"EOSINOPHIL,NEUTROPHIL\"\n")
    out = tmp_path / "bench"
    # operating threshold 0.25: the stand-in's miss scores 0.1 and its duplicate 0.3
    text = run_benchmark(voc, "test", out, analyzer=FakeAnalyzer(truth), cfg=PipelineConfig(conf=0.25, class_conf=()), data_cfg=data_cfg)
    return out, text, truth


def test_ground_truth_split_audit_and_subtypes(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=12, extra_objects={"BloodImage_00009": [("RBC", (-20, 5, 30, 40))]})
    subtypes = tmp_path / "wbc_subtypes.csv"
    subtypes.write_text(",Image,Category\n,9,NEUTROPHIL\n,10,\"EOSINOPHIL,NEUTROPHIL\"\n")
    _, truth = load_ground_truth(voc, "test", DataConfig(subtypes_csv=str(subtypes)))
    by_id = {a.image_id: a for a in truth}
    assert sorted(by_id) == ["BloodImage_00009", "BloodImage_00010", "BloodImage_00011"]
    assert all(a.split == "test" for a in truth)
    assert [b.label for b in by_id["BloodImage_00009"].boxes if group_of(b.label) == "WBC"] == ["Neutrophil"]
    assert [b.label for b in by_id["BloodImage_00010"].boxes if group_of(b.label) == "WBC"] == ["WBC"]
    assert min(b.x1 for b in by_id["BloodImage_00009"].boxes) >= 0  # the border box was clipped
    with pytest.raises(SmearError, match="available splits"):
        load_ground_truth(voc, "holdout", DataConfig(subtypes_csv=""))


def test_run_benchmark_end_to_end_summary_traces_to_tables(bench):
    out, text, truth = bench
    for name in ("cells.csv", "detections.csv", "images.csv", "summary.json", "summary.md",
                 "confusion_matrix_detector.png", "confusion_matrix_pipeline.png", "confusion_matrix_subtypes.png",
                 "errors_per_class.png", "counts_scatter.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    dets = pd.read_csv(out / "detections.csv")
    images = pd.read_csv(out / "images.csv", keep_default_na=False)
    n_img = len(truth)
    assert n_img == 3 and len(images) == 3

    # outcomes: exactly the errors the stand-in made, per image
    counts = cells["outcome"].value_counts().to_dict()
    assert s["attribution"]["outcomes"] == {o: counts.get(o, 0) for o in OUTCOMES}
    for o in ("missed", "detector_wrong_corrected_by_classifier", "classifier_broke_correct_detection",
              "both_wrong", "duplicate", "false_detection"):
        assert counts[o] == n_img, o
    n_true = sum(len(a.boxes) for a in truth)
    assert (cells["true_group"] != "").sum() == n_true
    assert s["attribution"]["classifier_net_effect"] == 0

    # cell precision / recall / F1 recomputed from cells.csv rows
    for mode, col in (("detector", "detector_label"), ("pipeline", "final_group")):
        tp = fp = fn = 0
        for g in GROUPS:
            t, p = cells["true_group"] == g, cells[col] == g
            tpg, fpg, fng = int((t & p).sum()), int((p & ~t).sum()), int((t & ~p).sum())
            pc = s["cell"][mode]["per_class"][g]
            assert (pc["tp"], pc["fp"], pc["fn"]) == (tpg, fpg, fng)
            tp, fp, fn = tp + tpg, fp + fpg, fn + fng
        assert s["cell"][mode]["precision"] == pytest.approx(tp / (tp + fp), abs=1e-4)
        assert s["cell"][mode]["recall"] == pytest.approx(tp / (tp + fn), abs=1e-4)
        assert s["cell"][mode]["F1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-4)
        # AP50 from the tp50 column of detections.csv and the true cells of cells.csv
        score_col = "detector_score" if mode == "detector" else "score"
        for g in GROUPS:
            sel = dets[dets[col] == g]
            ap = average_precision(sel[score_col], sel[f"tp50_{mode}"], int((cells["true_group"] == g).sum()))
            assert s["cell"][mode]["AP50"][g] == pytest.approx(ap, abs=1e-4)
        assert s["cell"][mode]["mAP50"] == pytest.approx(np.mean(list(s["cell"][mode]["AP50"].values())), abs=1e-4)
        assert s["cell"][mode]["mAP50_95"] <= s["cell"][mode]["mAP50"]
    # the cells found below the operating threshold are in detections.csv only
    assert (~dets["operating"]).sum() == 2 * n_img
    assert len(dets) == int((cells["detector_label"] != "").sum()) + 2 * n_img

    # image counts and errors recomputed from cells.csv
    for mode, col in (("detector", "detector_label"), ("pipeline", "final_group")):
        errs = {g: [] for g in GROUPS}
        for _, row in images.iterrows():
            mine = cells[cells["image"] == row["image"]]
            for g in GROUPS:
                n_t, n_p = int((mine["true_group"] == g).sum()), int((mine[col] == g).sum())
                assert (row[f"n_true_{g}"], row[f"n_{mode}_{g}"]) == (n_t, n_p)
                errs[g].append(abs(n_p - n_t))
        for g in GROUPS:
            assert s["image"][mode]["count_MAE"][g] == pytest.approx(np.mean(errs[g]), abs=1e-4)
            n_t = int((cells["true_group"] == g).sum())
            assert s["image"][mode]["count_rel_err"][g] == pytest.approx(sum(errs[g]) / n_t, abs=1e-4)
        agree = images[f"flags_agree_{mode}"].map(lambda v: str(v) == "True").mean()
        assert s["image"][mode]["flag_agreement"] == pytest.approx(agree, abs=1e-4)

    # subtypes: image 9 is Neutrophil (stand-in says Basophil), image 10 Lymphocyte, image 11 ambiguous
    sub = cells[cells["true_subtype"] != ""]
    assert sorted(sub["true_subtype"]) == ["Lymphocyte", "Neutrophil"]
    assert s["attribution"]["subtype_outcomes"]["wrong_subtype"] == 1
    assert s["cell"]["pipeline"]["subtype"]["accuracy"] == pytest.approx(
        (sub["subtype_outcome"] == "correct").sum() / (sub["subtype_outcome"] != "missed").sum(), abs=1e-4)

    md = (out / "summary.md").read_text()
    assert "RBC" in md and "incomplete" in md and "mAP50" in md
    assert "mAP50" in text and str(out) in text


def test_run_benchmark_operates_at_each_class_threshold(tmp_path):
    """A class's own threshold (class_conf) decides which of its candidates count; the others keep conf."""
    voc = write_voc(tmp_path / "voc", n_images=12)
    data_cfg = DataConfig(subtypes_csv="")
    _, truth = load_ground_truth(voc, "test", data_cfg)
    out = tmp_path / "bench"
    cfg = PipelineConfig(conf=0.25, class_conf=("Platelets=0.6",))
    run_benchmark(voc, "test", out, analyzer=FakeAnalyzer(truth), cfg=cfg, data_cfg=data_cfg)
    dets = pd.read_csv(out / "detections.csv")
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    # the stand-in's false detection is a platelet scoring 0.5: above conf, below the platelets' own 0.6
    floor = dets["detector_label"].map({"RBC": 0.25, "WBC": 0.25, "Platelets": 0.6})
    assert (dets["operating"] == (dets["detector_score"] >= floor)).all()
    assert "false_detection" not in set(cells["outcome"])
    s = json.loads((out / "summary.json").read_text())
    assert s["run"]["operating_thresholds"] == {"RBC": 0.25, "WBC": 0.25, "Platelets": 0.6}
    assert "operating conf 0.25 (Platelets 0.6)" in (out / "summary.md").read_text()


def test_run_benchmark_audited_counts_leave_out_an_unboxed_wbc(tmp_path):
    """A WBC the subtype table names but no box holds: the official count error has it, the audited one not."""
    import re

    voc, data_cfg, truth = _voc_with_subtypes(tmp_path, ",9,NEUTROPHIL\n,10,LYMPHOCYTE\n")
    analyzer = FakeAnalyzer(truth)  # still finds image 10's WBC
    xml = voc / "Annotations" / "BloodImage_00010.xml"
    xml.write_text(re.sub(r"<object><name>WBC</name>.*?</object>", "", xml.read_text()))
    assert [a.missing for a in load_ground_truth(voc, "test", data_cfg)[1]] == [[], ["WBC"], []]
    out = tmp_path / "bench"
    text = run_benchmark(voc, "test", out, analyzer=analyzer, cfg=PipelineConfig(conf=0.25, class_conf=()),
                         data_cfg=data_cfg)
    images = pd.read_csv(out / "images.csv", keep_default_na=False).set_index("image")
    assert images.loc["BloodImage_00010", "labels_missing"] == "WBC"
    assert images.loc["BloodImage_00010", "abs_err_pipeline_WBC"] >= 1
    s = json.loads((out / "summary.json").read_text())["image"]["pipeline"]
    err = images["abs_err_pipeline_WBC"]
    assert s["count_MAE"]["WBC"] == pytest.approx(err.mean(), abs=1e-4)
    assert s["audited"]["WBC"] == {"count_MAE": pytest.approx(err.drop("BloodImage_00010").mean(), abs=1e-4), "n_images": 2,
                                   "left_out": ["BloodImage_00010"]}
    assert set(s["audited"]) == {"WBC"}
    assert "WBC, audited labels" in text and "BloodImage_00010" in (out / "summary.md").read_text()


def test_run_benchmark_failed_image_left_out(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=4)
    data_cfg = DataConfig(subtypes_csv="")
    _, truth = load_ground_truth(voc, "all", data_cfg)

    class HalfBroken(FakeAnalyzer):
        def analyze_images(self, paths, progress=False):
            res = super().analyze_images(paths)
            res[0] = ImageResult(image=str(paths[0]), error="cannot decode")
            return res

    out = tmp_path / "bench"
    run_benchmark(voc, "all", out, analyzer=HalfBroken(truth), cfg=PipelineConfig(conf=0.25, class_conf=()), data_cfg=data_cfg)
    s = json.loads((out / "summary.json").read_text())
    assert s["run"]["n_failed"] == 1 and s["image"]["pipeline"]["n_images"] == 3
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    assert set(cells["image"]) == {a.image_id for a in truth[1:]}


def test_cli_benchmark_is_wired():
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    res = CliRunner().invoke(app, ["benchmark", "--help"])
    assert res.exit_code == 0 and "--split" in res.output


def test_a_wbc_boxed_as_a_platelet_leaves_the_image_out_of_both_audited_counts(tmp_path):
    """BCCD 00135: the WBC's box is there but named Platelets. Its WBC and its platelet counts are both
    wrong, so the audited count errors leave the image out of both."""
    import re

    voc, data_cfg, truth = _voc_with_subtypes(tmp_path, ",9,NEUTROPHIL\n,10,LYMPHOCYTE\n")
    xml = voc / "Annotations" / "BloodImage_00010.xml"
    xml.write_text(re.sub(r"<object><name>WBC</name>", "<object><name>Platelets</name>", xml.read_text()))
    assert [a.missing for a in load_ground_truth(voc, "test", data_cfg)[1]] == [[], ["WBC", "Platelets"], []]
    out = tmp_path / "bench"
    text = run_benchmark(voc, "test", out, analyzer=FakeAnalyzer(truth), cfg=PipelineConfig(conf=0.25, class_conf=()),
                         data_cfg=data_cfg)
    s = json.loads((out / "summary.json").read_text())["image"]["pipeline"]
    assert {g: a["left_out"] for g, a in s["audited"].items()} == {"WBC": ["BloodImage_00010"],
                                                                   "Platelets": ["BloodImage_00010"]}
    images = pd.read_csv(out / "images.csv", keep_default_na=False).set_index("image")
    assert images.loc["BloodImage_00010", "labels_missing"] == "WBC;Platelets"
    err = images["abs_err_pipeline_Platelets"]
    assert err["BloodImage_00010"] >= 1  # the "platelet" the analyzer rightly did not find
    assert s["audited"]["Platelets"]["count_MAE"] == pytest.approx(err.drop("BloodImage_00010").mean(), abs=1e-4)
    assert "Platelets, audited labels" in text


def test_the_benchmark_keeps_the_wbcs_analyze_keeps_on_the_classifiers_word():
    """A WBC candidate under the threshold is kept as 'smear analyze' keeps it (wbc_rescue): in the WBC group with
    >= wbc_rescue of the classifier's probability, scored >= 0.02, covered by no kept box for 30% of its area."""
    from smear.pipeline.benchmark.run import rescued_too
    from smear.pipeline.benchmark.tables import operating

    th = {"RBC": 0.4, "WBC": 0.3, "Platelets": 0.4}

    def scored(box, det_score, group, p):
        c = cell(box, "WBC", group, det_score=det_score)
        c.score = round(det_score * p, 4)
        return c

    cells = [cell([0, 0, 100, 100], "WBC", "WBC"),  # kept at its score
             scored([200, 0, 300, 100], 0.1, "WBC", 0.95),  # rescued
             scored([10, 10, 50, 50], 0.1, "WBC", 0.99),  # inside the kept WBC: a part of it
             scored([400, 0, 500, 100], 0.1, "WBC", 0.8),  # the classifier is not sure enough
             scored([0, 200, 100, 300], 0.01, "WBC", 0.99),  # under the rescue floor
             scored([200, 200, 300, 300], 0.1, "RBC", 0.95)]  # the classifier calls it an RBC
    keep = [operating(c, th) for c in cells]
    assert keep == [True] + [False] * 5
    assert rescued_too(cells, keep, th, 0.9) == [True, True, False, False, False, False]
    assert rescued_too(cells, keep, th, 0.0) == keep
