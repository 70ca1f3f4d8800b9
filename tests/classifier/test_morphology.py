"""RBC morphology stage: synthetic Chula-like folder, tiny untrained model, no network, no real data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cell

from smear.classifier.config import MorphologyConfig
from smear.classifier.predict import load_morphology_model
from smear.configs.errors import ModelNotFoundError, SmearError
from smear.data.chula import read_chula, split_images
from smear.data.crops import crop_square, mirrored_point_crop
from smear.data.taxonomy import MORPHOLOGY_CLASSES


def write_chula(root: Path, n_images: int = 8, cells_per_image: int = 6, unlabelled: int = 2) -> Path:
    """A tiny Chula-like folder: Dataset/N.jpg (pink discs, ~35 px), Label/N.txt ``x y class``."""
    import cv2

    (root / "Dataset").mkdir(parents=True)
    (root / "Label").mkdir()
    for i in range(1, n_images + unlabelled + 1):
        rng = random.Random(i)
        img = np.full((480, 640, 3), (200, 205, 215), np.uint8)
        lines = []
        for k in range(cells_per_image):
            x, y = 40 + 90 * k, rng.randint(40, 440)
            cv2.circle(img, (x, y), 17, (140, 110, 170), -1)
            lines.append(f"{x} {y} {(i + k) % len(MORPHOLOGY_CLASSES)}")
        cv2.imwrite(str(root / "Dataset" / f"{i}.jpg"), img)
        if i <= n_images:
            (root / "Label" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def chula(tmp_path) -> Path:
    return write_chula(tmp_path / "chula")


@pytest.fixture(scope="module")
def tiny_morphology(tmp_path_factory) -> Path:
    """An untrained morphology folder (mobilenet_v2, no pretrained weights, 32 px input)."""
    from tests.conftest import make_untrained_model_folder

    return make_untrained_model_folder(
        tmp_path_factory.mktemp("tiny_morphology"), MorphologyConfig,
        {"backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32}, MORPHOLOGY_CLASSES, "morphology")


def test_read_chula_skips_unlabelled_images(chula):
    data = read_chula(chula)
    assert sorted(data, key=int) == [str(i) for i in range(1, 9)]
    assert all(len(v) == 6 for v in data.values())
    assert {c.label for v in data.values() for c in v} <= set(MORPHOLOGY_CLASSES)


def test_read_chula_rejects_other_folders(tmp_path):
    with pytest.raises(SmearError, match="Dataset/ and Label/"):
        read_chula(tmp_path)


def test_split_is_by_image_and_deterministic():
    ids = [str(i) for i in range(1, 401)]
    a = split_images(ids, 0.15, 0.15, seed=0)
    b = split_images(list(reversed(ids)), 0.15, 0.15, seed=0)
    assert a == b
    assert sorted(sum(a.values(), []), key=int) == ids  # every image in exactly one split
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert 0.08 < len(a["test"]) / len(ids) < 0.22 and 0.08 < len(a["val"]) / len(ids) < 0.22
    # Adding images moves none of the old ones.
    c = split_images(ids + [str(i) for i in range(401, 500)], 0.15, 0.15, seed=0)
    assert all(set(a[s]) <= set(c[s]) for s in a)
    assert split_images(ids, 0.15, 0.15, seed=1) != a


def test_point_crops_are_centred_and_sized(chula):
    from smear.data.images import read_image

    cells = read_chula(chula)["1"]
    img = read_image(cells[0].image)
    for crop in [crop_square(img, c.x, c.y, 56, 64) for c in cells]:
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        centre, corner = crop[28:36, 28:36].mean(), crop[:6, :6].mean()
        assert centre < corner - 20  # the dark disc sits in the middle, background around it


def test_the_shipped_crop_is_kept_for_folders_trained_on_it(tiny_morphology):
    """A card without crop.border (the shipped model) gets the mirrored crop it was trained on; a new one the
    one crop of smear.data.crops, edges replicated."""
    import json
    import shutil

    field = np.zeros((50, 50, 3), np.uint8)
    field[:, :3] = 200  # a bright edge strip: mirroring and replication differ left of x=0
    legacy = load_morphology_model(str(tiny_morphology))
    assert np.array_equal(legacy.crop(field, 2, 25, 20), mirrored_point_crop(field, 2, 25, 20, 32))
    new = tiny_morphology.parent / "new"
    shutil.copytree(tiny_morphology, new)
    card = json.loads((new / "card.json").read_text())
    card["crop"] = {"border": "replicate"}
    (new / "card.json").write_text(json.dumps(card))
    model = load_morphology_model(str(new))
    assert np.array_equal(model.crop(field, 2, 25, 20), crop_square(field, 2, 25, 20, 32))
    assert not np.array_equal(model.crop(field, 2, 25, 20), legacy.crop(field, 2, 25, 20))


def test_missing_model_is_a_smear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="morphology"):
        load_morphology_model(str(tmp_path / "nothing"))


def test_annotate_sets_morphology_on_rbc_only(tiny_morphology, field_image):
    from smear.data.images import read_image

    model = load_morphology_model(str(tiny_morphology))
    img = read_image(field_image)
    cells = [make_cell("RBC", (100, 100, 180, 180)), make_cell("WBC", (300, 200, 420, 320)),
             make_cell("Platelets", (50, 50, 66, 66)), make_cell("RBC", (400, 100, 470, 172))]
    model.annotate(img, cells)
    assert [c.morphology is not None for c in cells] == [True, False, False, True]
    for c in cells[::3]:
        assert c.morphology["label"] in MORPHOLOGY_CLASSES and 0 <= c.morphology["score"] <= 1
    assert "morphology" not in cells[1].to_dict()
    info = model.info()
    assert info["classes"] == list(MORPHOLOGY_CLASSES) and info["weights"] == str(tiny_morphology)
    model.annotate(img, [])  # no cells: nothing to do


def test_crop_side_follows_the_field_median(tiny_morphology):
    model = load_morphology_model(str(tiny_morphology))
    crop, ref = model.config["cut_side_px"], model.config["cell_diameter_px"]
    boxes = [(0, 0, 70, 70)] * 6 + [(0, 0, 140, 140)]
    sides = model.crop_sides(boxes)
    assert sides[0] == sides[-1] == pytest.approx(crop * 70 / ref)  # one scale per field: sizes stay relative
    assert model.crop_sides([(0, 0, 140, 140)])[0] == pytest.approx(crop * 140 / ref)  # few RBCs: own box
    assert model.crop_sides(boxes, pixel_size_um=7.5 / ref)[0] == pytest.approx(crop)  # Chula's own scale


def test_train_and_evaluate_on_synthetic_data(chula, tmp_path):
    from smear.classifier.config import load_task_config
    from smear.classifier.evaluate import evaluate
    from smear.classifier.train import train
    from smear.configs.modelcard import render_card_md

    cfg = load_task_config("rbc-morphology", None, {
        "data_root": str(chula), "backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32,
        "epochs": 2, "samples_per_epoch": 32, "batch": 16, "val_fraction": 0.25, "test_fraction": 0.25,
        "project": str(tmp_path / "runs"), "name": "t"})
    folder = train(cfg, progress=False)
    card = json.loads((folder / "card.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    assert card["kind"] == "morphology" and card["task"] == "rbc-morphology"
    assert card["classes"] == list(MORPHOLOGY_CLASSES) and card["crop"]["border"] == "replicate"
    assert (folder / "weights.pt").is_file() and (folder / "card.md").read_text() == render_card_md(card, card["title"])
    assert sorted(sum(split.values(), []), key=int) == [str(i) for i in range(1, 9)]
    history = json.loads((folder / "history.json").read_text())
    assert [h["phase"] for h in history] == [2, 2] and history[1]["lr"] < history[0]["lr"]  # cosine decay
    assert card["val_metrics"]["normal_vs_abnormal"]["n"] >= 0 and "val_macro_f1" in history[0]
    assert (tmp_path / "runs" / "t" / "last.pt").is_file()
    rep = evaluate(folder, "train", tmp_path / "eval", write_card=True)  # the task comes from the card
    assert rep["n"] == 6 * len(split["train"]) and "macro_f1" in rep and "normal_vs_abnormal" in rep
    for name in ("metrics.json", "confusion_matrix.png", "predictions.csv", "curves.png"):
        assert (tmp_path / "eval" / name).is_file()
    card = json.loads((folder / "card.json").read_text())
    assert card["train_metrics"]["n"] == rep["n"]
    assert (folder / "card.md").read_text() == render_card_md(card, card["title"])
    with pytest.raises(SmearError, match="run folder exists"):
        train(cfg, progress=False)
    with pytest.raises(SmearError, match="task=rbc-morphology"):
        evaluate(folder, "train", task="cells")


def test_time_budget_stops_after_the_epoch_that_passes_it(chula, tmp_path):
    from smear.classifier.config import load_task_config
    from smear.classifier.train import train

    cfg = load_task_config("rbc-morphology", None, {
        "data_root": str(chula), "backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32,
        "epochs": 5, "samples_per_epoch": 32, "batch": 16, "max_minutes": 1e-6, "val_fraction": 0.25,
        "test_fraction": 0.25, "project": str(tmp_path / "runs"), "name": "t"})
    folder = train(cfg, progress=False)
    assert len(json.loads((folder / "history.json").read_text())) == 1


def test_cli_trains_and_evaluates_the_morphology_task(chula, tmp_path):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})

    r = invoke("classifier", "train", "task=rbc-morphology", f"data_root={chula}", "backbone=mobilenet_v2",
               "pretrained=none", "crop_size_px=32", "epochs=1", "samples_per_epoch=32", "batch=16",
               "val_fraction=0.25", "test_fraction=0.25", f"project={tmp_path}", "name=cli")
    assert r.exit_code == 0, r.output
    folder = tmp_path / "cli" / "model"
    assert json.loads((folder / "card.json").read_text())["task"] == "rbc-morphology"
    r = invoke("classifier", "evaluate", "--weights", folder, "--split", "train")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["split"] == "train" and "normal_vs_abnormal" in out and "groups_accuracy" not in out
    r = invoke("classifier", "train", "task=rbc-shapes")
    assert r.exit_code != 0 and "valid tasks are cells, wbc-subtypes, rbc-morphology" in str(r.exception)
    r = invoke("classifier", "train", "--task", "cells", "task=rbc-morphology")
    assert r.exit_code != 0 and "give the task once" in r.output
