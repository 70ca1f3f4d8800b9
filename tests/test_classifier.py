"""Classifier stage: two-step training on drawn cells, resume, cascade refinement, evaluation outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from smear.pipeline.errors import SmearError


@pytest.fixture
def tiny_manifest(tmp_path, tiny_voc):
    from smear.pipeline.dataset import DataConfig, prepare_dataset

    prepare_dataset([tiny_voc], tmp_path / "prep", DataConfig(crop_size_px=32), subtypes_csv=None)
    return tmp_path / "prep" / "crops" / "manifest.csv"


def _cfg(manifest, tmp_path, **kw):
    from smear.classifier.config import ClassifierConfig
    from smear.pipeline.config import build_config

    values = {"manifest": str(manifest), "backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32,
              "frozen_epochs": 1, "epochs": 1, "samples_per_epoch": 32, "batch": 16, "threads": 1,
              "project": str(tmp_path / "runs"), "name": "t"}
    values.update(kw)
    return build_config(ClassifierConfig, values)


def test_two_step_training_writes_a_loadable_model_folder(tiny_manifest, tmp_path):
    from smear.classifier.model import load_classifier
    from smear.classifier.train import train_classifier

    folder = train_classifier(_cfg(tiny_manifest, tmp_path), progress=False)
    card = json.loads((folder / "card.json").read_text())
    assert card["classes"][:2] == ["RBC", "Platelets"] and card["config"]["backbone"] == "mobilenet_v2"
    assert card["data"]["train_images"] > 0 and "commit" in card and "date" in card
    history = json.loads((folder / "history.json").read_text())
    assert [h["phase"] for h in history] == [1, 2]
    model = load_classifier(folder)
    assert model.crop_size_px == 32 and model.refiner is None
    # a second call with the same name refuses to overwrite, resume continues
    with pytest.raises(SmearError):
        train_classifier(_cfg(tiny_manifest, tmp_path), progress=False)
    train_classifier(_cfg(tiny_manifest, tmp_path, epochs=2), resume=True, progress=False)
    assert len(json.loads((folder / "history.json").read_text())) == 3


def test_split_leak_is_refused(tiny_manifest, tmp_path):
    from smear.classifier.train import read_manifest, train_classifier

    rows = read_manifest(tiny_manifest)
    with pytest.raises(SmearError, match="split by image"):
        train_classifier(_cfg(tiny_manifest, tmp_path), train_rows=rows, val_rows=rows[:3], progress=False)


def _cascade(tmp_path, tiny_classifier, min_prob: float) -> Path:
    primary = tmp_path / "primary"
    shutil.copytree(tiny_classifier, primary)
    shutil.copytree(tiny_classifier, tmp_path / "refiner")
    card = json.loads((primary / "card.json").read_text())
    card["refiner"] = {"weights": "../refiner", "groups": ["WBC"], "min_prob": min_prob}
    (primary / "card.json").write_text(json.dumps(card))
    return primary


def test_cascade_refines_only_possible_wbcs(tmp_path, tiny_classifier, monkeypatch):
    from smear.classifier import predict
    from smear.classifier.model import load_classifier
    from tests.conftest import draw_field

    img, boxes = draw_field(seed=5)
    xyxy = [b for _, b in boxes]
    always = load_classifier(_cascade(tmp_path / "a", tiny_classifier, 0.0))
    never = load_classifier(_cascade(tmp_path / "b", tiny_classifier, 1.01))
    assert always.refiner is not None and always.refine_groups == ("WBC",)
    calls = []
    real = predict.predict_crops

    def spy(model, crops, batch=256):
        calls.append((model is always.refiner or model is never.refiner, len(crops)))
        return real(model, crops, batch)

    monkeypatch.setattr(predict, "predict_crops", spy)
    predict.classify_fields(always, [img], [xyxy])
    assert calls == [(False, len(xyxy)), (True, len(xyxy))]
    calls.clear()
    predict.classify_fields(never, [img], [xyxy])
    assert calls == [(False, len(xyxy))]


def test_cascade_with_other_classes_is_refused(tmp_path, tiny_classifier):
    from smear.classifier.model import load_classifier

    primary = _cascade(tmp_path, tiny_classifier, 0.05)
    card = json.loads((tmp_path / "refiner" / "card.json").read_text())
    card["classes"] = card["classes"][::-1]
    (tmp_path / "refiner" / "card.json").write_text(json.dumps(card))
    with pytest.raises(SmearError, match="differ"):
        load_classifier(primary)


def test_evaluate_writes_metrics_and_plots(tiny_manifest, tiny_classifier, tmp_path):
    from smear.classifier.evaluate import evaluate_classifier

    rep = evaluate_classifier(tiny_classifier, tiny_manifest, "val", tmp_path / "eval")
    for name in ("metrics.json", "confusion_matrix.png", "confusion_matrix_groups.png", "roc.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()
    assert 0.0 <= rep["groups"]["accuracy"] <= 1.0 and set(rep["groups"]["per_class"]) == {"RBC", "WBC", "Platelets"}
    assert sum(map(sum, rep["confusion_matrix"]["matrix"])) == rep["n"]


def test_missing_imagenet_weights_error_is_clear():
    from smear.classifier.model import build_backbone

    with pytest.raises(SmearError, match="nothing is downloaded"):
        build_backbone("resnet50", "imagenet")


def test_classification_report_groups_and_subtypes():
    from smear.classifier.evaluate import classification_report

    rep = classification_report(["RBC", "Neutrophil", "Eosinophil", "Platelets"],
                                ["RBC", "Eosinophil", "Eosinophil", "RBC"],
                                ["RBC", "Platelets", "Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil"],
                                np.eye(7)[[0, 3, 3, 0]])
    assert rep["groups"]["accuracy"] == 0.75  # the neutrophil-as-eosinophil is right at group level
    assert rep["subtype"]["accuracy"] == 0.5 and rep["subtype"]["n"] == 2
