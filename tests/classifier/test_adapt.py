"""Training across labs: the set-valued loss, stain augmentation, leave-one-lab-out rows, and 'classifier adapt'."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from smear.configs.errors import SmearError


def test_set_valued_loss_is_cross_entropy_for_one_class_and_group_likelihood_for_wbc():
    from smear.classifier.train import allowed_classes, set_valued_loss
    from smear.data.taxonomy import CELL_CLASSES, SUBTYPES

    torch.manual_seed(0)
    logits = torch.randn(6, len(CELL_CLASSES))
    labels = ["RBC", "Lymphocyte", "Erythroblast", "Platelets", "Neutrophil", "Basophil"]
    one = torch.tensor([allowed_classes(lab, CELL_CLASSES) for lab in labels])
    target = torch.tensor([CELL_CLASSES.index(lab) for lab in labels])
    for eps in (0.0, 0.1):
        assert set_valued_loss(logits, one, eps) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps)), rel=1e-5)
    wbc = torch.tensor([allowed_classes("WBC", CELL_CLASSES)])
    assert wbc.sum() == len(SUBTYPES) and not wbc[0, CELL_CLASSES.index("Erythroblast")]
    p = torch.softmax(logits[:1], 1)[0]
    assert float(set_valued_loss(logits[:1], wbc)) == pytest.approx(-float(torch.log(p[wbc[0]].sum())), rel=1e-5)
    with pytest.raises(SmearError, match="Blast"):
        allowed_classes("Blast", CELL_CLASSES)


def test_hed_jitter_keeps_the_crop_and_changes_the_stain():
    from smear.classifier.train import blur_and_jpeg, hed_jitter

    rng = np.random.default_rng(0)
    crop = rng.integers(40, 250, (32, 32, 3), dtype=np.uint8)
    same = hed_jitter(crop, 0.0, random.Random(0))
    assert same.dtype == np.uint8 and same.shape == crop.shape
    assert np.abs(same.astype(int) - crop).max() <= 2  # sigma 0: only the round trip's rounding
    moved = hed_jitter(crop, 0.3, random.Random(1))
    assert np.abs(moved.astype(int) - crop).mean() > 3
    blurred = blur_and_jpeg(crop, 1.0, 0.0, random.Random(0))
    assert blurred.shape == crop.shape and blurred.std() < crop.std()
    assert blur_and_jpeg(crop, 0.0, 0.0, random.Random(0)) is crop


def test_training_rows_from_several_manifests_leave_a_lab_out(tmp_path):
    from smear.classifier.config import ClassifierConfig
    from smear.classifier.train import model_classes, read_training_rows

    cols = ["crop_path", "source_image", "image_id", "x1", "y1", "x2", "y2", "label", "group", "split"]
    bccd = tmp_path / "bccd" / "crops" / "manifest.csv"  # an older manifest: no source column
    bccd.parent.mkdir(parents=True)
    with open(bccd, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        wr.writerow(["", "a.jpg", "a", 0, 0, 9, 9, "RBC", "RBC", "train"])
        wr.writerow(["", "a.jpg", "a", 0, 0, 9, 9, "Neutrophil", "WBC", "train"])
    other = tmp_path / "pbc" / "manifest.csv"
    other.parent.mkdir()
    with open(other, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols + ["source"])
        wr.writerow(["", "b.jpg", "b", 0, 0, 9, 9, "ImmatureGranulocyte", "WBC", "train", "pbc"])
        wr.writerow(["", "c.jpg", "c", 0, 0, 9, 9, "WBC", "WBC", "train", "raabin"])
    cfg = ClassifierConfig(manifest=f"{bccd},{other}")
    rows = read_training_rows(cfg)
    assert [(r.source, r.label) for r in rows] == [("bccd", "RBC"), ("bccd", "Neutrophil"),
                                                   ("pbc", "ImmatureGranulocyte"), ("raabin", "WBC")]
    assert model_classes(cfg, rows) == ("RBC", "Neutrophil", "ImmatureGranulocyte")  # group-only WBC is no class
    out = read_training_rows(ClassifierConfig(manifest=f"{bccd},{other}", exclude_sources="PBC, raabin"))
    assert {r.source for r in out} == {"bccd"}


def _cells_dir(root, classes=("lymphocyte", "IG"), n=4):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = np.full((40, 40, 3), 220, np.uint8)
            cv2.circle(img, (20, 20), 8 + 4 * k, (150, 50, 150 - 60 * k), -1)
            cv2.imwrite(str(root / name / f"{i}.png"), img)
    return root


def test_adapt_writes_a_model_folder_that_classify_loads(tmp_path, tiny_classifier):
    from smear.classifier.adapt import AdaptConfig, adapt
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_files

    cells = _cells_dir(tmp_path / "cells")
    (cells / "lymphocyte" / "broken.png").write_bytes(b"not an image")
    out = adapt(cells, tmp_path / "adapted", tiny_classifier, AdaptConfig(steps=3, batch=4, threads=1))
    card = json.loads((out / "card.json").read_text())
    assert card["adapt"]["cells_per_class"] == {"ImmatureGranulocyte": 4, "Lymphocyte": 5}
    assert len(card["adapt"]["unreadable"]) == 1 and "broken.png" in card["adapt"]["unreadable"][0]
    assert card["base_model"]["folder"] == str(tiny_classifier)
    model = load_classifier(out)
    assert model.classes == json.loads((tiny_classifier / "card.json").read_text())["classes"]
    base = load_classifier(tiny_classifier)
    # WBC folders only: the base network keeps the group decision, the adapted one is the subtype stage
    assert card["subtyper"]["weights"] == "subtypes" and model.subtyper is not None
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), base.net.state_dict().values()))
    changed = [n for (n, a), b in zip(model.subtyper.net.state_dict().items(), base.net.state_dict().values())
               if a.is_floating_point() and not torch.equal(a, b)]
    assert changed and all(not n.startswith("features.0.") for n in changed)  # head and deep stages only
    recs = classify_files(model, sorted((cells / "lymphocyte").glob("*.png")))
    assert all(r.get("label") in model.classes for r in recs if "error" not in r)


def test_adapt_from_a_base_with_a_subtype_stage_adapts_its_network_and_replaces_that_stage(tmp_path, tiny_classifier):
    import shutil

    from smear.classifier.adapt import AdaptConfig, adapt
    from smear.classifier.export import declare_cascade
    from smear.classifier.model import load_classifier

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_classifier, base)
    shutil.copytree(tiny_classifier, tmp_path / "models" / "other")
    declare_cascade(base, subtyper=tmp_path / "models" / "other")
    out = adapt(_cells_dir(tmp_path / "cells"), tmp_path / "adapted", base, AdaptConfig(steps=2, batch=4, threads=1))
    card = json.loads((out / "card.json").read_text())
    assert card["base_model"]["subtype_stage_replaced"] == "../other"
    model = load_classifier(out)
    assert card["subtyper"]["weights"] == "subtypes" and model.subtyper.folder == (out / "subtypes").resolve()
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(),
                                                 load_classifier(base).net.state_dict().values()))
    # a fast first stage with a refiner is no base: it does not see a cell in detail
    declare_cascade(base, subtyper="none", refiner=tmp_path / "models" / "other")
    with pytest.raises(SmearError, match="refiner"):
        adapt(tmp_path / "cells", tmp_path / "again", base, AdaptConfig(steps=2, batch=4, threads=1))


def test_a_subtype_stage_that_knows_other_classes_only_shares_out_the_wbc_probability(tiny_classifier):
    """The group probabilities stay the first stage's; the WBC mass is split in the subtype stage's ratios among
    the subtypes alone."""
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import rescore_cascade
    from smear.data.taxonomy import SUBTYPES

    model = load_classifier(tiny_classifier)
    sub = load_classifier(tiny_classifier)  # knows RBC and platelets too
    model.subtyper, model.subtype_min_prob = sub, 0.5
    classes = model.classes
    probs = np.zeros((2, len(classes)), np.float32)
    probs[0, classes.index("RBC")] = 0.3
    probs[0, classes.index("Neutrophil")] = 0.7
    probs[1, classes.index("RBC")] = 0.9
    probs[1, classes.index("Lymphocyte")] = 0.1
    crops = [np.full((32, 32, 3), v, np.uint8) for v in (90, 200)]
    before = probs.copy()
    rescore_cascade(model, probs, lambda k, m: crops[k])
    wbc = [classes.index(c) for c in SUBTYPES if c in classes]
    assert probs[0, wbc].sum() == pytest.approx(0.7, abs=1e-5) and probs[0, classes.index("RBC")] == 0.3
    from smear.classifier.predict import predict_crops

    p = predict_crops(sub, [crops[0]])[0][[sub.classes.index(classes[j]) for j in wbc]]
    assert probs[0, wbc] == pytest.approx(0.7 * p / p.sum(), abs=1e-5)
    assert (probs[1] == before[1]).all()  # WBC probability below min_prob: untouched


def test_adapt_refuses_unknown_class_folders_and_empty_input(tmp_path, tiny_classifier):
    from smear.classifier.adapt import AdaptConfig, adapt

    with pytest.raises(SmearError, match="blast"):
        adapt(_cells_dir(tmp_path / "a", ("blast",)), tmp_path / "o1", tiny_classifier, AdaptConfig(steps=1))
    (tmp_path / "empty" / "lymphocyte").mkdir(parents=True)
    with pytest.raises(SmearError, match="no cell images"):
        adapt(tmp_path / "empty", tmp_path / "o2", tiny_classifier, AdaptConfig(steps=1))


def test_adapt_cli_names_the_cells_used(tmp_path, tiny_classifier):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    cells = _cells_dir(tmp_path / "cells", ("Neutrophil",), n=3)
    res = CliRunner().invoke(app, ["classifier", "adapt", str(cells), "--output", str(tmp_path / "m"), "--base",
                                   str(tiny_classifier), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "adapted on 3 cells: Neutrophil 3" in res.output and (tmp_path / "m" / "weights.pt").is_file()
    again = CliRunner().invoke(app, ["classifier", "adapt", str(cells), "--output", str(tmp_path / "m")])
    assert again.exit_code != 0 and "not empty" in again.output


def test_package_completes_the_card_and_refuses_to_overwrite(tmp_path, tiny_classifier):
    from smear.classifier.train import package_classifier

    src = tmp_path / "run" / "model"
    import shutil

    shutil.copytree(tiny_classifier, src)
    card = json.loads((src / "card.json").read_text())
    card["data"] = {"sources": ["bccd", "pbc"]}
    (src / "card.json").write_text(json.dumps(card))
    dest = package_classifier(src, tmp_path / "models" / "m", {"summary": "a test model"})
    got = json.loads((dest / "card.json").read_text())
    assert got["summary"] == "a test model" and "CPUs" in got["machine"]
    assert set(got["data_sources"]) == {"bccd", "pbc"} and "CC BY 4.0" in got["data_sources"]["pbc"]
    assert "a test model" in (dest / "card.md").read_text()
    with pytest.raises(SmearError, match="exists"):
        package_classifier(src, dest)


def test_batchnorm_recalibration_moves_only_the_trained_layers_statistics(tiny_classifier):
    """AdaBN for a classifier: the statistics of the batch-norm layers that trained follow the lab's cells; frozen
    stages (ImageNet statistics in training too) and every weight stay as they were."""
    from smear.classifier.adapt import recalibrate_batchnorm
    from smear.classifier.model import load_classifier

    model = load_classifier(tiny_classifier, with_refiner=False)
    rng = np.random.default_rng(0)
    cells = [(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), (4.0, 4.0, 36.0, 36.0)) for _ in range(6)]
    net = recalibrate_batchnorm(model, cells, min_inputs=64)
    before, after = model.net.state_dict(), net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var",
                                                                                   "num_batches_tracked")))
    trained = {id(m) for stage in net.stages[len(net.stages) - round(len(net.stages) * 0.5):]
               for m in stage.modules()}
    moved = {n: not torch.equal(before[f"{n}.running_mean"], m.running_mean)
             for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    by_id = {n: id(m) for n, m in net.named_modules()}
    assert any(moved.values()) and all(moved[n] == (by_id[n] in trained) for n in moved)
    assert not net.training
    with pytest.raises(SmearError, match="no cell"):
        recalibrate_batchnorm(model, [])


def test_adapt_from_unlabelled_fields_re_estimates_only_the_subtype_stage(tmp_path, tiny_classifier):
    """--fields: the shipped detector finds the WBCs of the sample fields; the subtype stage's trained statistics follow
    them, its weights and the whole first stage stay the base model's; a bad file is named and the rest goes on."""
    import shutil

    from typer.testing import CliRunner

    from smear.classifier.export import declare_cascade
    from smear.classifier.model import load_classifier
    from smear.pipeline.cli import app

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_classifier, base)
    shutil.copytree(tiny_classifier, tmp_path / "models" / "stage")
    declare_cascade(base, subtyper=tmp_path / "models" / "stage")
    samples = Path(__file__).resolve().parents[2] / "data" / "samples"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00")
    res = CliRunner().invoke(app, ["classifier", "adapt", "--fields", str(samples / "BloodImage_00007.jpg"),
                                   "--fields", str(bad), "--output", str(tmp_path / "m"), "--base", str(base)])
    assert res.exit_code == 0, res.output
    assert "broken.jpg" in res.output and "of 1 fields" in res.output
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["batchnorm_adaptation"]["fields"] == 1 and card["batchnorm_adaptation"]["wbcs"] >= 1
    model, before = load_classifier(tmp_path / "m"), load_classifier(base)
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), before.net.state_dict().values()))
    new, old = model.subtyper.net.state_dict(), before.subtyper.net.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old if not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked")))
    assert any(not torch.equal(new[k], old[k]) for k in old if k.endswith("running_mean"))
    neither = CliRunner().invoke(app, ["classifier", "adapt", "--output", str(tmp_path / "n")])
    assert neither.exit_code != 0 and "one of the two" in neither.output


def test_a_wbc_neighbourhood_gives_the_crops_the_whole_field_gives():
    """--fields keeps a WBC's neighbourhood, not the field: every training crop of it (widest margin, zoom, shift and
    a 45 degree turn) is the same as from the whole field."""
    from smear.data.crops import crop_cell
    from smear.pipeline.adapt import wbc_neighbourhood

    field = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    box = (300.0, 200.0, 380.0, 290.0)
    part, inner = wbc_neighbourhood(field, box)
    assert part.shape[0] < field.shape[0] and part.shape[1] < field.shape[1]
    for kwargs in ({}, {"angle_deg": 45.0, "zoom": 0.85, "shift": (0.08, -0.08)}):
        whole, near = (crop_cell(image, b, 0.3, 64, **kwargs).astype(int) for image, b in ((field, box), (part, inner)))
        assert np.abs(whole - near).max() <= 1  # a grey level of rounding in the sub-pixel sampling, at most


def test_self_training_keeps_the_confident_half_of_each_called_class_and_tunes_only_the_deep_layers(tiny_classifier):
    """Self-training after the statistics: each unlabelled cell named once by the re-estimated network, the more
    confident half of each called class taken as labels, then the deep stages and the head tuned on them; frozen
    stages keep their weights, and the result is a network in eval mode that needs no gradient."""
    import dataclasses

    from smear.classifier.adapt import AdaptConfig, recalibrate_batchnorm, self_train
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import crops_from_boxes, predict_crops

    model = load_classifier(tiny_classifier, with_refiner=False)
    rng = np.random.default_rng(1)
    cells = []
    for k in range(9):
        img = np.full((40, 40, 3), 220, np.uint8)
        cv2.circle(img, (20, 20), 6 + k, tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
        cells.append((img, (4.0, 4.0, 36.0, 36.0)))
    cfg = AdaptConfig(steps=3, batch=4, threads=1, seed=3)
    net, used = self_train(model, cells, cfg)
    recalibrated = dataclasses.replace(model, net=recalibrate_batchnorm(model, cells, seed=cfg.seed))
    called = predict_crops(recalibrated, [crops_from_boxes(model, im, [b])[0] for im, b in cells]).argmax(1)
    expected = {model.classes[k]: max(1, round(0.5 * n)) for k, n in zip(*np.unique(called, return_counts=True))}
    assert used["cells"] == 9 and used["pseudo_labelled"] == dict(sorted(expected.items()))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    before, after = model.net.state_dict(), net.state_dict()
    frozen = [k for k in before if k.startswith("features.0.") and not k.endswith(("running_mean", "running_var",
                                                                                    "num_batches_tracked"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head"))
