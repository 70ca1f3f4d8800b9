"""'smear classifier ensemble': one model folder that averages several networks' class probabilities, usable as any
model folder is (loaded, exported to ONNX, a cascade's subtype stage, re-estimated by adapt --fields)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smear.configs.errors import SmearError


def member(folder: Path, seed: int, classes=None, crop: int = 32) -> Path:
    """An untrained 32 px classifier folder whose weights depend on ``seed``."""
    from smear.classifier.config import ClassifierConfig
    from smear.classifier.model import CellClassifier, save_model_folder
    from smear.configs.loader import build_config, config_to_dict
    from smear.data.taxonomy import SUBTYPES

    classes = list(classes or SUBTYPES)
    cfg = build_config(ClassifierConfig, {"backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": crop,
                                          "seed": seed, "name": f"run-{seed}"})
    torch.manual_seed(seed)
    net = CellClassifier(cfg.backbone, len(classes), cfg.head_hidden, cfg.dropout, "none")
    for m in net.modules():  # statistics unlike the defaults, so that re-estimating them is seen
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    save_model_folder(folder, net, {"kind": "classifier", "classes": classes, "config": config_to_dict(cfg),
                                    "commit": f"c{seed}", "best_epoch": seed + 3})
    return folder


def crops(n: int = 6, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_an_ensemble_gives_the_mean_of_its_members_probabilities_and_records_each_run(tmp_path):
    from smear.classifier.export import make_ensemble
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import predict_crops

    a, b = member(tmp_path / "a", 0), member(tmp_path / "b", 1)
    out = make_ensemble([a, b], tmp_path / "ab")
    pa, pb = (predict_crops(load_classifier(f), crops()) for f in (a, b))
    assert not np.allclose(pa, pb, atol=1e-3)  # the members differ, so the mean is a real check
    got = predict_crops(load_classifier(out), crops())
    np.testing.assert_allclose(got, (pa + pb) / 2, atol=1e-5)
    card = json.loads((out / "card.json").read_text())
    assert [m["seed"] for m in card["ensemble"]["members"]] == [0, 1]
    assert [m["best_epoch"] for m in card["ensemble"]["members"]] == [3, 4]
    assert (out / "card.md").is_file() and "Ensemble of 2" in (out / "card.md").read_text()


def test_members_that_do_not_fit_together_are_refused_by_name(tmp_path):
    from smear.classifier.export import make_ensemble
    from smear.data.taxonomy import CELL_CLASSES

    a = member(tmp_path / "a", 0)
    with pytest.raises(SmearError, match="other"):
        make_ensemble([a, member(tmp_path / "other", 1, classes=CELL_CLASSES)], tmp_path / "x")
    with pytest.raises(SmearError, match="differ"):
        make_ensemble([a, member(tmp_path / "big", 1, crop=48)], tmp_path / "x")
    with pytest.raises(SmearError, match="at least two"):
        make_ensemble([a], tmp_path / "x")
    make_ensemble([a, member(tmp_path / "b", 1)], tmp_path / "ab")
    with pytest.raises(SmearError, match="exists"):
        make_ensemble([a, tmp_path / "b"], tmp_path / "ab")
    with pytest.raises(SmearError, match="already"):
        make_ensemble([a, tmp_path / "ab"], tmp_path / "y")


def test_an_ensemble_subtype_stage_runs_on_onnx_as_on_torch(tmp_path, tiny_classifier):
    pytest.importorskip("onnxruntime")
    import shutil

    from smear.classifier.export import declare_cascade, export_classifier, make_ensemble
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_fields
    from tests.conftest import draw_field

    shutil.copytree(tiny_classifier, tmp_path / "primary")
    stage = make_ensemble([member(tmp_path / "a", 0), member(tmp_path / "b", 1)], tmp_path / "ab")
    declare_cascade(tmp_path / "primary", subtyper=stage, subtype_min_prob=0.0)
    export_classifier(tmp_path / "primary")
    torch_model, onnx_model = (load_classifier(tmp_path / "primary", runtime=r, threads=1) for r in ("torch", "onnx"))
    assert onnx_model.subtyper.runtime == "onnx" and len(torch_model.subtyper.net.members) == 2
    field, boxes = draw_field(seed=0, n_wbc=2)
    boxes = [np.array([b for _, b in boxes], np.float32)]
    np.testing.assert_allclose(classify_fields(torch_model, [field], boxes)[0],
                               classify_fields(onnx_model, [field], boxes)[0], atol=1e-4)


def test_adapt_from_fields_re_estimates_every_member_of_an_ensemble_stage(tmp_path, tiny_classifier):
    import shutil

    from smear.classifier.adapt import recalibrate_batchnorm, save_subtype_stage_adapted
    from smear.classifier.export import declare_cascade, make_ensemble
    from smear.classifier.model import load_classifier

    shutil.copytree(tiny_classifier, tmp_path / "primary")
    stage = make_ensemble([member(tmp_path / "a", 0), member(tmp_path / "b", 1)], tmp_path / "ab")
    declare_cascade(tmp_path / "primary", subtyper=stage)
    model = load_classifier(tmp_path / "primary")
    rng = np.random.default_rng(0)
    cells = [(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), (4.0, 4.0, 36.0, 36.0)) for _ in range(6)]
    net = recalibrate_batchnorm(model.subtyper, cells, min_inputs=64)
    out = save_subtype_stage_adapted(model, net, tmp_path / "adapted", {"fields": 1, "wbcs": 6})
    adapted = load_classifier(out)
    old = model.subtyper.net.state_dict()
    new = adapted.subtyper.net.state_dict()
    for k in ("members.0.", "members.1."):  # each member's trained statistics moved, its weights did not
        assert any(not torch.equal(new[n], old[n]) for n in old if n.startswith(k) and n.endswith("running_mean"))
    assert all(torch.equal(new[n], old[n]) for n in old if not n.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked")))


def test_ensemble_cli_writes_the_folder(tmp_path):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    a, b = member(tmp_path / "a", 0), member(tmp_path / "b", 1)
    res = CliRunner().invoke(app, ["classifier", "ensemble", str(a), str(b), "--output", str(tmp_path / "ab")])
    assert res.exit_code == 0, res.output
    assert "2 networks averaged" in res.output and (tmp_path / "ab" / "weights.pt").is_file()
    bad = CliRunner().invoke(app, ["classifier", "ensemble", str(a), str(tmp_path / "nope"), "--output",
                                   str(tmp_path / "c")])
    assert bad.exit_code != 0 and isinstance(bad.exception, SmearError) and "nope" in str(bad.exception)
