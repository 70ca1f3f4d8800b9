"""'smear classifier export' and the onnx runtime: the same probabilities and labels as torch, cascade included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def cascade(tmp_path, tiny_classifier):
    """A primary with a refiner and a subtype stage (copies of the tiny classifier), none exported yet."""
    for name in ("primary", "refiner", "subtypes"):
        shutil.copytree(tiny_classifier, tmp_path / name)
    card = json.loads((tmp_path / "primary" / "card.json").read_text())
    card["refiner"] = {"weights": "../refiner", "groups": ["WBC"], "min_prob": 0.0}
    card["subtyper"] = {"weights": "../subtypes", "min_prob": 0.0}
    (tmp_path / "primary" / "card.json").write_text(json.dumps(card))
    return tmp_path / "primary"


def test_export_writes_every_member_and_records_it_in_the_card(cascade):
    from typer.testing import CliRunner

    from smear.configs.runtime import file_sha256
    from smear.pipeline.cli import app

    res = CliRunner().invoke(app, ["classifier", "export", "--weights", str(cascade)])
    assert res.exit_code == 0, res.output
    for name in ("primary", "refiner", "subtypes"):
        folder = cascade.parent / name
        assert (folder / "weights.onnx").is_file(), name
        card = json.loads((folder / "card.json").read_text())
        assert card["runtimes"] == {"torch": "weights.pt", "onnx": "weights.onnx"}
        assert card["onnx_export"]["from_sha256"] == file_sha256(folder / "weights.pt")
        assert (folder / "card.md").is_file()


def test_onnx_and_torch_runtimes_give_the_same_probabilities_and_labels(cascade):
    from smear.classifier.export import export_classifier
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_fields
    from tests.conftest import draw_field

    export_classifier(cascade)
    torch_model = load_classifier(cascade, runtime="torch")
    onnx_model = load_classifier(cascade, runtime="onnx", threads=1)
    assert [m.runtime for m in (onnx_model, onnx_model.refiner, onnx_model.subtyper)] == ["onnx"] * 3
    assert torch_model.runtime == "torch" and onnx_model.onnx_fallbacks() == []
    fields, boxes = zip(*[draw_field(seed=s, n_wbc=2) for s in (0, 1)])
    boxes = [np.array([b for _, b in bs], np.float32) for bs in boxes]
    for a, b in zip(classify_fields(torch_model, fields, boxes, batch=7), classify_fields(onnx_model, fields, boxes,
                                                                                        batch=7)):
        assert a.shape == b.shape and len(a) > 10
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert (a.argmax(1) == b.argmax(1)).all()


def test_a_member_without_weights_onnx_runs_on_torch_and_says_how_to_export(cascade):
    from smear.classifier.export import export_classifier
    from smear.classifier.model import load_classifier

    export_classifier(cascade)
    (cascade.parent / "refiner" / "weights.onnx").unlink()
    model = load_classifier(cascade, runtime="onnx")
    assert (model.runtime, model.refiner.runtime, model.subtyper.runtime) == ("onnx", "torch", "onnx")
    (why,) = model.onnx_fallbacks()
    assert "no weights.onnx" in why and "smear classifier export" in why

    (cascade.parent / "subtypes" / "weights.onnx").write_bytes(b"not an onnx graph")  # corrupt
    model = load_classifier(cascade, runtime="onnx")
    assert model.subtyper.runtime == "torch" and "cannot be read by ONNX Runtime" in model.subtyper.onnx_fallback


def test_the_morphology_model_runs_on_onnx_too(tmp_path):
    from smear.classifier.config import ClassifierConfig
    from smear.classifier.export import export_classifier
    from smear.classifier.predict import load_morphology_model
    from tests.conftest import draw_field, make_untrained_model_folder

    folder = make_untrained_model_folder(tmp_path / "morph", ClassifierConfig,
                                         {"backbone": "mobilenet_v2", "pretrained": "none", "crop_size_px": 32},
                                         [f"c{i}" for i in range(13)], "morphology")
    card = json.loads((folder / "card.json").read_text())
    card["config"].update({"cut_side_px": 40, "cell_diameter_px": 36})
    (folder / "card.json").write_text(json.dumps(card))
    export_classifier(folder)
    field, boxes = draw_field(seed=4)
    rbc = [b for lab, b in boxes if lab == "RBC"]
    a = load_morphology_model(folder, runtime="torch").classify_boxes(field, rbc)
    b = load_morphology_model(folder, runtime="onnx")
    assert b.model.runtime == "onnx"
    np.testing.assert_allclose(a, b.classify_boxes(field, rbc), atol=1e-4)
