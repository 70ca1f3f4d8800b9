"""``smear data prepare`` on the real BCCD set in ../shared/data (slow; skipped where the data is absent)."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from conftest import SHARED_DATA, requires_shared_data
from typer.testing import CliRunner

from smear.pipeline.cli import app

pytestmark = [pytest.mark.slow, requires_shared_data]

BCCD = SHARED_DATA / "bccd"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("bccd")
    # No --source: the default config must find ../shared/data/bccd (and its subtype csv) on its own.
    r = CliRunner().invoke(app, ["data", "prepare", "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return {"out": out, "stdout": r.stdout, "summary": json.loads((out / "summary.json").read_text())}


def test_bccd_counts_and_official_split(prepared):
    s = prepared["summary"]
    assert s["images"] == 364
    assert s["images_per_split"] == {"train": 205, "val": 87, "test": 72}
    assert s["failed_images"] == []
    assert "images: 364 (train 205, val 87, test 72)" in prepared["stdout"]
    for split in ("train", "val", "test"):
        official = set((BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split())
        written = {p.stem for p in (prepared["out"] / "yolo" / "images" / split).iterdir()}
        assert written == official


def test_bccd_audit_not_empty(prepared):
    s = prepared["summary"]
    assert s["audit_counts"], "BCCD has known defects; an empty audit means the audit is not running"
    assert any(k.startswith("dropped:") for k in s["audit_counts"])
    with open(prepared["out"] / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(s["audit_counts"].values())
    assert all(r["reason"] for r in rows)
    assert "audit" in prepared["stdout"]


def test_bccd_crops_and_subtypes(prepared):
    s = prepared["summary"]
    assert s["boxes_per_class"]["WBC"] > 300 and s["boxes_per_class"]["RBC"] > 3000
    subtype_crops = sum(s["crops_per_label"][k] for k in ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte",
                                                            "Basophil"))
    assert subtype_crops > 300  # the subtype csv was applied
    with open(prepared["out"] / "crops" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(s["crops_per_label"].values())
    assert Counter(r["split"] for r in rows).keys() == {"train", "val", "test"}
