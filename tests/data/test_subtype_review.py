"""benchmarks/subtype_disagreements.py: the review sheet of doubtful WBC subtype labels and applying a review."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import cv2
import pytest
from conftest import draw_field

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("subtype_disagreements", ROOT / "benchmarks" / "subtype_disagreements.py")
sd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sd)

SUBS = sd.SUBTYPE_ORDER


def cv_row(image, true, probs, fold=0):
    p = dict(zip(SUBS, probs))
    pred = max(p, key=p.get)
    return {"fold": str(fold), "image_id": image, "x1": "10", "y1": "10", "x2": "110", "y2": "110", "true": true,
            "pred": pred, "score": str(p[pred]), **{f"p_{s}": str(v) for s, v in p.items()}}


CV = [cv_row("BloodImage_00001", "Eosinophil", (0.6, 0.3, 0.05, 0.03, 0.02)),
      cv_row("BloodImage_00002", "Neutrophil", (0.9, 0.05, 0.02, 0.02, 0.01)),
      cv_row("BloodImage_00003", "Monocyte", (0.97, 0.01, 0.01, 0.005, 0.005))]


def test_disagreements_keep_only_errors_most_confident_first():
    rows = sd.disagreements(CV)
    assert [r["image_id"] for r in rows] == ["BloodImage_00003", "BloodImage_00001"]
    assert rows[0]["label"] == "Monocyte" and rows[0]["predicted"] == "Neutrophil"
    assert rows[0]["p_predicted"] == 0.97 and rows[0]["p_label"] == 0.005 and rows[0]["reviewed"] == ""


def test_apply_review_relabels_clears_unclear_and_rejects_bad_values():
    table = [{"": "", "Image": "1", "Category": "EOSINOPHIL"}, {"": "", "Image": "3", "Category": "MONOCYTE"},
             {"": "", "Image": "4", "Category": "LYMPHOCYTE"}]
    review = [{"image_id": "BloodImage_00001", "reviewed": "neutrophil"},
              {"image_id": "BloodImage_00003", "reviewed": "unclear"}, {"image_id": "BloodImage_00004", "reviewed": ""}]
    out, changes = sd.apply_review(review, [dict(r) for r in table])
    assert [r["Category"] for r in out] == ["NEUTROPHIL", "", "LYMPHOCYTE"]
    assert len(changes) == 2 and "EOSINOPHIL -> NEUTROPHIL" in changes[0]
    with pytest.raises(ValueError, match="BloodImage_00001.*'Blast' is not one of"):
        sd.apply_review([{"image_id": "BloodImage_00001", "reviewed": "Blast"}], [dict(r) for r in table])
    with pytest.raises(ValueError, match="not in the subtype table"):
        sd.apply_review([{"image_id": "BloodImage_00009", "reviewed": "Neutrophil"}], [dict(r) for r in table])


def test_script_writes_sheet_and_review_then_applies_it(tmp_path, capsys):
    images = tmp_path / "JPEGImages"
    images.mkdir()
    for k in (1, 2, 3):
        img, _ = draw_field(seed=k)
        cv2.imwrite(str(images / f"BloodImage_{k:05d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv_csv = tmp_path / "cv.csv"
    with open(cv_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CV[0]))
        w.writeheader()
        w.writerows(CV)
    out = tmp_path / "review"
    assert sd.main(["--cv", str(cv_csv), "--images", str(images), "--output", str(out)]) == 0
    assert "3 subtype-labelled WBCs, 2 predicted otherwise" in capsys.readouterr().out
    sheet = cv2.imread(str(out / "sheet.jpg"))
    assert sheet is not None and sheet.shape[0] > 100
    with open(out / "review.csv", newline="") as f:
        review = list(csv.DictReader(f))
    review[0]["reviewed"] = "Neutrophil"  # the expert agrees with the model on BloodImage_00003
    with open(out / "review.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(review[0]))
        w.writeheader()
        w.writerows(review)
    table = tmp_path / "subtypes.csv"
    table.write_text(",Image,Category\n,1,EOSINOPHIL\n,2,NEUTROPHIL\n,3,MONOCYTE\n")
    fixed = tmp_path / "fixed.csv"
    assert sd.main(["--apply", str(out / "review.csv"), "--subtypes", str(table), "--out", str(fixed)]) == 0
    assert fixed.read_text().splitlines() == [",Image,Category", ",1,EOSINOPHIL", ",2,NEUTROPHIL", ",3,NEUTROPHIL"]
