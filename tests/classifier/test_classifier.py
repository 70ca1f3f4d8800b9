"""Classifier stage: two-step training on drawn cells, resume, cascade refinement, evaluation outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from smear.configs.errors import SmearError


@pytest.fixture
def tiny_manifest(tmp_path, tiny_voc):
    from smear.data.config import DataConfig
    from smear.data.prepare import prepare_dataset

    prepare_dataset([tiny_voc], tmp_path / "prep", DataConfig(crop_size_px=32), subtypes_csv=None)
    return tmp_path / "prep" / "crops" / "manifest.csv"


def _cfg(manifest, tmp_path, **kw):
    from smear.classifier.config import ClassifierConfig
    from smear.configs.loader import build_config

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
    assert card["task"] == "cells" and card["best_epoch"] == 2  # the one phase-2 epoch
    assert card["val_metrics"]["n"] == card["data"]["val_crops"] > 0 and "groups" in card["val_metrics"]
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
    from smear.classifier.train import train_classifier
    from smear.data.crops import read_manifest

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


def _subtype_manifest(tiny_manifest: Path, tmp_path: Path) -> Path:
    """The tiny manifest with its WBC rows relabelled as subtypes (the drawn set has plain 'WBC' boxes)."""
    import csv

    rows = list(csv.DictReader(open(tiny_manifest)))
    wbc = [r for r in rows if r["label"] == "WBC"]
    for k, r in enumerate(wbc):
        r["label"] = ("Neutrophil", "Eosinophil")[k % 2]
    out = tmp_path / "subtype_manifest.csv"
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return out


def test_subtype_model_trains_on_wbc_crops_only(tiny_manifest, tmp_path):
    from smear.classifier.model import load_classifier
    from smear.classifier.train import train_classifier
    from smear.data.taxonomy import SUBTYPES

    manifest = _subtype_manifest(tiny_manifest, tmp_path)
    folder = train_classifier(_cfg(manifest, tmp_path, classes="subtypes", name="sub"), progress=False)
    card = json.loads((folder / "card.json").read_text())
    # the model names the subtypes its data holds, in the taxonomy's order (no immature granulocyte here)
    assert card["classes"] == ["Neutrophil", "Eosinophil"] == [c for c in SUBTYPES if c in ("Neutrophil", "Eosinophil")]
    assert set(card["data"]["train_counts"]) == {"Neutrophil", "Eosinophil"}
    assert sum(card["data"]["train_counts"].values()) == card["data"]["train_crops"]  # no RBC or platelet crop
    assert load_classifier(folder).classes == ["Neutrophil", "Eosinophil"]


def _with_subtyper(tmp_path, tiny_classifier, min_prob: float) -> Path:
    from smear.classifier.config import ClassifierConfig
    from smear.data.taxonomy import SUBTYPES
    from tests.conftest import make_untrained_model_folder

    primary = tmp_path / "primary"
    shutil.copytree(tiny_classifier, primary)
    make_untrained_model_folder(tmp_path / "subtypes", ClassifierConfig,
                                {"backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 40,
                                 "classes": "subtypes"}, SUBTYPES, "classifier")
    card = json.loads((primary / "card.json").read_text())
    card["subtyper"] = {"weights": "../subtypes", "min_prob": min_prob}
    (primary / "card.json").write_text(json.dumps(card))
    return primary


def test_subtyper_shares_out_the_wbc_mass_and_keeps_groups(tmp_path, tiny_classifier):
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import predict_crops, rescore_cascade
    from smear.data.crops import crop_cell
    from smear.data.taxonomy import SUBTYPES
    from tests.conftest import draw_field

    model = load_classifier(_with_subtyper(tmp_path, tiny_classifier, 0.5))
    assert model.subtyper is not None and model.subtyper.crop_size_px == 40
    img, boxes = draw_field(seed=5)
    xyxy = [b for _, b in boxes][:4]
    wbc_cols = [model.classes.index(c) for c in SUBTYPES]
    probs = np.full((4, len(model.classes)), 0.02, np.float32)
    probs[0, wbc_cols] = [0.5, 0.3, 0.05, 0.05, 0.0, 0.0]  # WBC mass 0.9: re-scored
    probs[1, 0] = 0.9  # an RBC: left alone
    probs[2, wbc_cols] = 0.1  # WBC mass 0.5: re-scored (>= min_prob)
    probs[3, 1] = 0.9  # a platelet: left alone
    probs /= probs.sum(1, keepdims=True)
    before = probs.copy()
    calls = []

    def crop_of(k, stage):
        calls.append(k)
        return crop_cell(img, xyxy[k], stage.crop_margin, stage.crop_size_px)

    rescore_cascade(model, probs, crop_of)
    assert calls == [0, 2]
    expected = predict_crops(model.subtyper, [crop_cell(img, xyxy[k], model.subtyper.crop_margin, 40) for k in (0, 2)])
    for row, p_sub in zip((0, 2), expected):
        mass = before[row, wbc_cols].sum()
        assert np.allclose(probs[row, wbc_cols], mass * p_sub, atol=1e-6)
        assert np.allclose(probs[row, :2], before[row, :2])  # RBC and platelet probabilities unchanged
    assert np.allclose(probs[[1, 3]], before[[1, 3]])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def _orientation_aware(classes, size: int, seed: int, gain: float = 20.0):
    """A stand-in classifier whose call depends on where in the crop the colours lie (an untrained CNN with
    global pooling gives the same call for every rotation, so it cannot show what the views do)."""
    import torch
    from torch import nn

    from smear.classifier.model import ClassifierModel

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, len(classes))).eval()
    with torch.no_grad():
        net[1].weight.mul_(gain)
    return ClassifierModel(net=net, classes=list(classes), crop_size_px=size, crop_margin=0.2)


def test_subtype_views_average_the_subtype_call_over_rotations_and_keep_groups(tmp_path, tiny_classifier):
    """Test-time augmentation: a likely WBC's subtype shares are the mean over its rotated and mirrored crops;
    its RBC and platelet probabilities, and every cell under the WBC threshold, stay as they were."""
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import dihedral_view, predict_crops, rescore_cascade
    from smear.data.taxonomy import SUBTYPES

    model = load_classifier(tiny_classifier)
    model.subtyper = _orientation_aware(SUBTYPES, 40, seed=0)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    wbc_cols = [model.classes.index(c) for c in SUBTYPES]
    probs = np.zeros((2, len(model.classes)), np.float32)
    probs[0, 0], probs[0, wbc_cols[0]] = 0.2, 0.8  # a likely WBC
    probs[1, 0], probs[1, wbc_cols[2]] = 0.7, 0.3  # an RBC: left alone
    before = probs.copy()
    plain = rescore_cascade(model, probs.copy(), lambda k, m: crops[k])
    assert model.subtype_views == 1
    model.subtype_views = 8
    tta = rescore_cascade(model, probs.copy(), lambda k, m: crops[k])
    views = np.mean([predict_crops(model.subtyper, [dihedral_view(crops[0], v)]) for v in range(8)], axis=0)[0]
    assert tta[0, wbc_cols] == pytest.approx(0.8 * views / views.sum(), abs=1e-5)
    assert np.abs(tta[0] - plain[0]).max() > 0.01  # the views change this model's call
    assert tta[0, 0] == plain[0, 0] == pytest.approx(0.2) and (tta[1] == before[1]).all()


def test_subtype_views_without_a_subtype_stage_share_out_the_models_own_wbc_mass():
    from smear.classifier.predict import dihedral_view, predict_crops, rescore_cascade
    from smear.data.taxonomy import CELL_CLASSES, SUBTYPES

    model = _orientation_aware(CELL_CLASSES, 32, seed=1, gain=2.0)
    crop = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    probs = predict_crops(model, [crop])
    assert (rescore_cascade(model, probs.copy(), lambda k, m: crop) == probs).all()  # 1 view: nothing to do
    model.subtype_views, model.subtype_min_prob = 4, 0.0
    out = rescore_cascade(model, probs.copy(), lambda k, m: crop)
    wbc = [model.classes.index(c) for c in SUBTYPES if c in model.classes]
    mean = np.mean([predict_crops(model, [dihedral_view(crop, v)])[0] for v in range(4)], axis=0)[wbc]
    assert out[0, wbc] == pytest.approx(probs[0, wbc].sum() * mean / mean.sum(), abs=1e-5)
    assert probs[0, wbc].sum() > 0.2 and np.abs(out[0, wbc] - probs[0, wbc]).max() > 0.01
    other = [j for j in range(len(model.classes)) if j not in wbc]
    assert out[0, other] == pytest.approx(probs[0, other], abs=1e-7)


def test_views_are_scored_a_batch_at_a_time_with_the_same_result(monkeypatch):
    from smear.classifier import predict
    from smear.data.taxonomy import CELL_CLASSES

    model = _orientation_aware(CELL_CLASSES, 16, seed=2, gain=2.0)
    crops = list(np.random.default_rng(3).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8))
    whole = predict.predict_views(model, crops, 8, batch=256)
    sizes = []
    real = predict.predict_crops
    monkeypatch.setattr(predict, "predict_crops", lambda m, c, b=256: sizes.append(len(c)) or real(m, c, b))
    chunked = predict.predict_views(model, crops, 8, batch=16)
    assert sizes == [16] * 5 and chunked == pytest.approx(whole, abs=1e-6)
    mean = real(model, [predict.dihedral_view(crops[7], v) for v in range(8)]).mean(0)  # crop 7's 8 views
    assert chunked[7] == pytest.approx(mean, abs=1e-6)


def test_dihedral_views_are_the_eight_symmetries_of_the_crop():
    from smear.classifier.predict import dihedral_view

    crop = np.arange(3 * 3 * 3).reshape(3, 3, 3)
    views = [dihedral_view(crop, k) for k in range(8)]
    assert (views[0] == crop).all() and len({v.tobytes() for v in views}) == 8
    assert all(sorted(v.ravel()) == sorted(crop.ravel()) for v in views)
    assert all(v.flags.c_contiguous for v in views)


@pytest.mark.parametrize("views", [3, 0, "8", True])
def test_a_card_with_a_wrong_subtype_views_is_a_one_line_error(tmp_path, tiny_classifier, views):
    from smear.classifier.model import load_classifier

    folder = tmp_path / "m"
    shutil.copytree(tiny_classifier, folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "subtype_views": views}))
    with pytest.raises(SmearError, match=r"card\.json: subtype_views must be one of 1, 2, 4, 8"):
        load_classifier(folder)
    (folder / "card.json").write_text(json.dumps({**card, "subtype_views": 8}))
    assert load_classifier(folder).subtype_views == 8


def test_subtyper_runs_in_classify_fields_and_files(tmp_path, tiny_classifier, monkeypatch):
    import cv2

    from smear.classifier import predict
    from smear.classifier.model import load_classifier
    from tests.conftest import draw_field

    always = load_classifier(_with_subtyper(tmp_path / "a", tiny_classifier, 0.0))
    img, boxes = draw_field(seed=6)
    xyxy = [b for _, b in boxes]
    seen = []
    real = predict.predict_crops

    def spy(model, crops, batch=256):
        seen.append((model is always.subtyper, len(crops), crops[0].shape[0] if len(crops) else 0))
        return real(model, crops, batch)

    monkeypatch.setattr(predict, "predict_crops", spy)
    out = predict.classify_fields(always, [img], [xyxy])[0]
    assert seen == [(False, len(xyxy), 32), (True, len(xyxy), 40)]
    assert out.shape == (len(xyxy), len(always.classes)) and np.allclose(out.sum(1), 1.0, atol=1e-5)
    seen.clear()
    p = tmp_path / "cell.png"
    cv2.imwrite(str(p), img[:80, :80])
    recs = predict.classify_files(always, [p])
    assert seen[-1][0] and recs[0]["label"] in always.classes


def test_subtyper_with_unknown_classes_is_refused(tmp_path, tiny_classifier):
    from smear.classifier.model import load_classifier

    primary = _with_subtyper(tmp_path, tiny_classifier, 0.5)
    card = json.loads((tmp_path / "subtypes" / "card.json").read_text())
    card["classes"] = ["Neutrophil", "Blast", "Lymphocyte", "Monocyte", "Basophil", "ImmatureGranulocyte"]
    (tmp_path / "subtypes" / "card.json").write_text(json.dumps(card))
    with pytest.raises(SmearError, match="Blast"):
        load_classifier(primary)


def test_cascade_command_declares_a_subtype_stage_that_loads_and_removes_it(tmp_path, tiny_classifier):
    from typer.testing import CliRunner

    from smear.classifier.model import load_classifier
    from smear.pipeline.cli import app

    stages = tmp_path / "models"
    shutil.copytree(tiny_classifier, stages / "primary")
    sub_folder = _with_subtyper(tmp_path / "made", tiny_classifier, 0.5).parent / "subtypes"
    shutil.copytree(sub_folder, stages / "subtypes")
    runner = CliRunner()
    res = runner.invoke(app, ["classifier", "cascade", str(stages / "primary"), "--subtyper", str(stages / "subtypes"),
                              "--subtype-min-prob", "0.4"])
    assert res.exit_code == 0, res.output
    card = json.loads((stages / "primary" / "card.json").read_text())
    assert card["subtyper"] == {"weights": "../subtypes", "min_prob": 0.4}  # relative: the folders move together
    assert "subtyper" in (stages / "primary" / "card.md").read_text()
    model = load_classifier(stages / "primary")
    assert model.subtyper is not None and model.subtype_min_prob == 0.4 and model.subtyper.crop_size_px == 40
    res = runner.invoke(app, ["classifier", "cascade", str(stages / "primary"), "--subtyper", "none"])
    assert res.exit_code == 0, res.output
    assert "subtyper" not in json.loads((stages / "primary" / "card.json").read_text())
    assert load_classifier(stages / "primary").subtyper is None


def test_a_cascade_that_does_not_load_leaves_the_card_as_it_was(tmp_path, tiny_classifier):
    from smear.classifier.export import declare_cascade

    primary = tmp_path / "primary"
    shutil.copytree(tiny_classifier, primary)
    before = (primary / "card.json").read_text()
    # a cell classifier as the subtype stage: its RBC and platelet classes are fine, but a refiner with the
    # classes in another order is not
    other = tmp_path / "other"
    shutil.copytree(tiny_classifier, other)
    card = json.loads((other / "card.json").read_text())
    card["classes"] = card["classes"][::-1]
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(SmearError, match="differ"):
        declare_cascade(primary, refiner=other)
    assert (primary / "card.json").read_text() == before
    with pytest.raises(SmearError, match="Blood"):
        declare_cascade(primary, refiner=other, refine_groups=("Blood",))
    with pytest.raises(SmearError, match="another model folder"):
        declare_cascade(primary, subtyper=primary)
    assert (primary / "card.json").read_text() == before


def test_padding_a_batch_to_a_few_shapes_leaves_the_probabilities_unchanged(tiny_classifier):
    """On a GPU, batches are padded to a power of two (few shapes to prepare kernels for); the blank
    crops must not change any real crop's probabilities (eval-mode batch norm) nor add rows."""
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import padded_size, predict_crops

    model = load_classifier(tiny_classifier, with_refiner=False)
    rng = np.random.default_rng(0)
    size = model.crop_size_px
    crops = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(11)]
    plain = predict_crops(model, crops, batch=4, pad=False)
    padded = predict_crops(model, crops, batch=4, pad=True)
    assert plain.shape == padded.shape == (11, len(model.classes))
    assert np.allclose(plain, padded, atol=1e-5)
    assert [padded_size(n, 256) for n in (1, 8, 9, 100, 255, 256)] == [8, 8, 16, 128, 256, 256]
    assert padded_size(70, 100) == 100 and padded_size(3, 4) == 4


def test_tasks_pick_their_config_and_classes():
    from smear.classifier.config import ClassifierConfig, MorphologyConfig, load_task_config, task_of
    from smear.configs.errors import ConfigError

    assert load_task_config(None) == ClassifierConfig()
    sub = load_task_config("wbc-subtypes", None, {"crop_size_px": 128})
    assert (sub.classes, sub.crop_size_px, task_of(sub)) == ("subtypes", 128, "wbc-subtypes")
    assert task_of(load_task_config(None, None, {"classes": "subtypes"})) == "wbc-subtypes"
    morph = load_task_config("rbc-morphology", None, {"epochs": 3})
    assert isinstance(morph, MorphologyConfig) and morph.epochs == 3 and task_of(morph) == "rbc-morphology"
    with pytest.raises(ConfigError, match="valid tasks are cells, wbc-subtypes, rbc-morphology"):
        load_task_config("subtypes")
    with pytest.raises(ConfigError, match="task=cells trains classes=cells"):
        load_task_config("cells", None, {"classes": "subtypes"})
    with pytest.raises(ConfigError, match="unknown MorphologyConfig key 'crop_margin'"):
        load_task_config("rbc-morphology", None, {"crop_margin": 0.2})  # point crops have no box margin
    assert load_task_config("rbc-morphology", None, {"crop_size_px": 48}).crop_size_px == 48  # one name, every task


def test_training_crops_are_the_inference_crop_at_the_field_edge(monkeypatch):
    """With every jitter off, a training crop of a box that leaves the field is the inference crop (edges
    replicated, not mirrored): a cell at the edge looks the same to the model in training and in use."""
    import random

    from smear.classifier import train
    from smear.classifier.config import ClassifierConfig
    from smear.data.crops import crop_cell
    from tests.conftest import draw_field

    img, _ = draw_field(seed=3)
    cfg = ClassifierConfig(crop_size_px=48, center_jitter=0, margin_jitter=0, zoom=0, rotate=False, flip=False)
    monkeypatch.setattr(train, "stain_jitter", lambda crop, *a: crop)
    for box in [(-12.0, 40.0, 30.0, 85.0), (600.0, 430.0, 660.0, 490.0), (100.0, 100.0, 140.0, 150.0)]:
        expected = crop_cell(img, box, cfg.crop_margin, cfg.crop_size_px)
        assert np.array_equal(train.augmented_crop(img, box, cfg, random.Random(0)), expected)


def test_the_inference_crop_replicates_edges_and_rotates_about_the_cell():
    from smear.data.crops import crop_cell

    field = np.zeros((60, 80, 3), np.uint8)
    field[:, :40] = 200  # bright left half
    field[20:40, 5:15] = 90  # a cell at the left edge
    crop = crop_cell(field, (-5, 20, 15, 40), 0.0, 40)  # its box leaves the field
    assert (crop[:, :10] == 200).all()  # replicated field, not the mirrored cell
    turned = crop_cell(field, (30, 20, 50, 40), 0.25, 30, angle_deg=90.0)  # centred on the bright/dark boundary
    assert turned[:10].max() == 0 and turned[-10:].min() == 200  # a quarter turn: the bright left half is now below
