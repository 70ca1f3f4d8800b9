"""The ``smear`` CLI through typer's CliRunner, plus one real subprocess call of the installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from conftest import AnalyzerBuilt, draw_field, write_voc
from typer.testing import CliRunner

from smear.configs.errors import ConfigError, SmearError
from smear.data.crops import crop_cell
from smear.pipeline.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def _write_field(path: Path, seed: int) -> Path:
    img, _ = draw_field(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def test_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    for cmd in ("analyze", "classify", "annotate", "benchmark", "info", "data", "detector", "classifier"):
        assert cmd in r.output
    assert "smear analyze field.jpg" in r.output  # help made of worked examples


@pytest.mark.parametrize("sub,commands", [("data", ["prepare"]), ("detector", ["train", "evaluate", "export"]),
                                          ("classifier", ["train", "evaluate"])])
def test_sub_app_help(sub, commands):
    r = invoke(sub, "--help")
    assert r.exit_code == 0, r.output
    for c in commands:
        assert c in r.output


def test_data_prepare_prints_counts_and_audit(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=4, extra_objects={"BloodImage_00000": [("RBC", (50, 50, 40, 90))]})
    out = tmp_path / "prepared"
    r = invoke("data", "prepare", "--source", voc, "--out", out, "subtypes_csv=")
    assert r.exit_code == 0, r.output
    assert "images: 4 (train 2, val 1, test 1)" in r.stdout
    assert "boxes per class: RBC 48, WBC 4, Platelets 8" in r.stdout
    assert "audit" in r.stdout and "dropped: degenerate box" in r.stdout
    assert (out / "yolo" / "data.yaml").is_file() and (out / "crops" / "manifest.csv").is_file()
    assert (out / "audit.csv").is_file() and (out / "summary.json").is_file()


def test_data_prepare_with_config_file_and_missing_image(tmp_path):
    voc = write_voc(tmp_path / "voc", n_images=3)
    (voc / "JPEGImages" / "BloodImage_00001.jpg").unlink()
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"source: {voc}\nsubtypes_csv: ''\ncrop_size_px: 32\n")
    out = tmp_path / "prepared"
    r = invoke("data", "prepare", "--config", cfg, "--out", out)
    assert r.exit_code == 1  # the set is written, but a failed image is not a success
    assert "images: 2" in r.stdout
    assert "BloodImage_00001" in r.stderr and "could not be read" in r.stderr
    crop = next((out / "crops").rglob("*.png"))
    assert cv2.imread(str(crop)).shape == (32, 32, 3)


def test_bad_config_key_raises_config_error_in_runner(tmp_path):
    r = invoke("data", "prepare", "--source", tmp_path, "--out", tmp_path / "o", "epoch=3")
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError)  # main() turns it into one line; see the subprocess test
    assert "unknown DataConfig key 'epoch'" in str(r.exception)


@pytest.fixture(scope="module")
def analyze_args(tiny_detector, tiny_classifier) -> list[str]:
    return ["--set", f"detector_weights={tiny_detector}", "--set", f"classifier_weights={tiny_classifier}",
            "--set", "morphology_weights=none", "--set", "threads=1", "--conf", "0.0001"]


def test_analyze_writes_outputs_and_fails_on_broken_input(tmp_path, analyze_args):
    good = _write_field(tmp_path / "in" / "f1.png", 1)
    bad = tmp_path / "in" / "f2.jpg"
    bad.write_bytes(b"garbage")
    good2 = _write_field(tmp_path / "in" / "f3.bmp", 3)
    missing = tmp_path / "in" / "nope.png"
    out = tmp_path / "out"
    r = invoke("analyze", good, bad, good2, missing, *analyze_args, "--output", out)
    assert r.exit_code == 1, r.output
    assert "2 of 4 file(s) failed" in r.stderr and "f2.jpg" in r.stderr and "nope.png" in r.stderr
    assert "f1.png" in r.stdout and "slide all: 2 fields" in r.stdout
    assert f"smear review {out}" in r.stdout  # the command to review these very outputs, ready to paste
    records = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(x["image"]).name for x in records] == ["f1.png", "f2.jpg", "f3.bmp", "nope.png"]
    assert [bool(x["error"]) for x in records] == [False, True, False, True]
    assert all(x["slide"] == "all" for x in records)
    assert (out / "summary.csv").read_text().count("\n") == 5
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["00000_f1.png", "00002_f3.png"]
    html = (out / "report.html").read_text()
    assert "http" not in html
    assert json.loads((out / "slides.json").read_text())[0]["n_fields"] == 2
    run = json.loads((out / "run.json").read_text())  # what made these results
    assert run["thresholds"] == {"RBC": 0.0001, "WBC": 0.0001, "Platelets": 0.0001}  # --conf: one for all
    assert run["config"]["conf"] == 0.0001 and run["config"]["class_conf"] == []
    detector_given = Path(analyze_args[1].split("=", 1)[1])
    assert Path(run["models"]["detector"]["weights"]).resolve().is_relative_to(detector_given.resolve())
    assert "test_metrics" not in run["models"]["detector"] and run["smear"] and run["date"]


def test_analyze_json_and_slides_from_subfolders(tmp_path, analyze_args):
    _write_field(tmp_path / "slides" / "A" / "1.png", 1)
    _write_field(tmp_path / "slides" / "B" / "2.png", 2)
    r = invoke("analyze", tmp_path / "slides", *analyze_args, "--json", "--capture-mode", "random")
    assert r.exit_code == 0, r.output
    records = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [x["slide"] for x in records] == ["A", "B"]
    assert all(x["error"] is None and x["cells"] for x in records)


def test_analyze_bad_option_value(tmp_path, analyze_args):
    f = _write_field(tmp_path / "f.png", 1)
    r = invoke("analyze", f, *analyze_args, "--capture-mode", "sideways")
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    assert "'random'" in str(r.exception)


def test_analyze_nothing_found(tmp_path, analyze_args):
    (tmp_path / "empty").mkdir()
    r = invoke("analyze", tmp_path / "empty", *analyze_args)
    assert r.exit_code == 1 and "a folder with no images" in r.stderr


def test_analyze_missing_inputs_fail_before_any_model_loads_and_write_nothing(tmp_path, monkeypatch):
    import smear.pipeline.analyze as analyze

    def no_models(*a, **k):
        raise AssertionError("a model was loaded for inputs that do not exist")

    monkeypatch.setattr(analyze.Analyzer, "__init__", no_models)
    r = invoke("analyze", tmp_path / "no_such.jpg", tmp_path / "nor_this.png", "--output", tmp_path / "out")
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == (f"smear: error: nothing to analyse: {tmp_path / 'no_such.jpg'}: no such file; "
                                f"{tmp_path / 'nor_this.png'}: no such file")


def test_an_output_folder_with_a_previous_run_needs_overwrite_which_clears_it(tmp_path, monkeypatch):
    import smear.pipeline.analyze as analyze
    from smear.pipeline.cli import prepare_output

    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "00007_stale.png").write_bytes(b"x")
    (out / "results.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(analyze.Analyzer, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    f = _write_field(tmp_path / "f.png", 1)
    r = invoke("analyze", f, "--output", out)
    assert r.exit_code == 1 and "holds a previous run (results.jsonl, overlays)" in r.stderr
    assert (out / "overlays" / "00007_stale.png").exists()  # nothing touched
    prepare_output(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only smear's own files went
    (out / "results.jsonl").write_text("{}\n")
    (out / "review.sqlite").write_bytes(b"")
    r = invoke("analyze", f, "--output", out, "--overwrite")
    assert r.exit_code == 1 and "holds a review" in r.stderr and (out / "results.jsonl").exists()


def test_analyze_on_a_device_this_machine_lacks_is_one_line(tmp_path, monkeypatch):
    import torch

    import smear.pipeline.analyze as analyze

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(analyze.Analyzer, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    f = _write_field(tmp_path / "f.png", 1)
    for device, shown in (("cuda", "'cuda'"), ("cuda:3", "'cuda:3'"), ("tpu", "'tpu'")):
        r = invoke("analyze", f, "--device", device)
        assert r.exit_code != 0 and isinstance(r.exception, SmearError), r.output
        msg = str(r.exception)
        assert "\n" not in msg and shown in msg and "available: cpu" in msg


def test_classify_crops_with_a_broken_file(tmp_path, tiny_classifier):
    img, boxes = draw_field(seed=0)
    crops = tmp_path / "crops"
    crops.mkdir()
    for k, (label, box) in enumerate(boxes[:3]):
        crop = crop_cell(img, box, 0.15, 64)
        cv2.imwrite(str(crops / f"cell{k}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    (crops / "cell9.jpg").write_bytes(b"")
    out = tmp_path / "out"
    r = invoke("classify", crops, "--weights", tiny_classifier, "--output", out)
    assert r.exit_code == 1, r.output
    assert "1 file(s) failed" in r.stderr and "cell9.jpg" in r.stderr
    records = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(x["image"]).name for x in records] == ["cell0.png", "cell1.png", "cell2.png", "cell9.jpg"]
    assert "empty file" in records[3]["error"] and "label" not in records[3]
    for x in records[:3]:
        assert x["label"] in x["probs"] and abs(sum(x["probs"].values()) - 1) < 0.01 and 0 < x["score"] <= 1
    # without --output: a table on stdout
    r = invoke("classify", crops / "cell0.png", "--weights", tiny_classifier)
    assert r.exit_code == 0 and "cell0.png" in r.stdout and "label" in r.stdout


def test_classify_runs_the_shipped_cascade_on_onnx_with_torchs_calls(tmp_path):
    """The default runtime for pre-cut cells is ONNX Runtime, as for analyze; the calls are torch's."""
    img = cv2.cvtColor(cv2.imread(str(ROOT / "data" / "samples" / "BloodImage_00007.jpg")), cv2.COLOR_BGR2RGB)
    crops = tmp_path / "crops"
    crops.mkdir()
    for k, (x, y) in enumerate(((60, 60), (320, 240), (500, 400))):
        cv2.imwrite(str(crops / f"cell{k}.png"), cv2.cvtColor(img[y - 50:y + 50, x - 50:x + 50], cv2.COLOR_RGB2BGR))
    calls = {}
    for runtime in ("onnx", "torch"):
        out = tmp_path / runtime
        r = invoke("classify", crops, "--runtime", runtime, "--output", out)
        assert r.exit_code == 0, r.output
        calls[runtime] = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [c["label"] for c in calls["onnx"]] == [c["label"] for c in calls["torch"]]
    for a, b in zip(calls["onnx"], calls["torch"]):
        assert all(abs(a["probs"][k] - b["probs"][k]) <= 2e-3 for k in a["probs"])
    from smear.classifier.model import load_classifier

    assert load_classifier(None, runtime="onnx").onnx_fallbacks() == []  # what --runtime onnx ran: every member
    r = invoke("classify", crops, "--runtime", "tensorrt")
    assert r.exit_code == 1 and "choose onnx or torch" in r.stderr


def _smear_script() -> str:
    local = Path(sys.executable).parent / "smear"
    found = str(local) if local.is_file() else shutil.which("smear")
    if not found:
        pytest.fail("the 'smear' console script is not installed; run pip install -e .")
    return found


def test_installed_console_script(tmp_path):
    smear = _smear_script()
    env = {**os.environ, "COLUMNS": "120"}
    t0 = time.perf_counter()
    r = subprocess.run([smear, "--help"], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and "analyze" in r.stdout
    assert elapsed < 10, f"'smear --help' took {elapsed:.1f}s; heavy imports belong inside commands"

    r = subprocess.run([smear, "data", "prepare", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                        "extra_bad_key=1"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("smear: error:") and "extra_bad_key" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "o").exists()


def test_cli_import_does_not_load_torch():
    code = ("import sys, smear.pipeline.cli; "
            "print(sorted(m for m in ('torch', 'ultralytics', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("extra, expected", [
    ([], {"RBC": 0.35, "WBC": 0.2, "Platelets": 0.4}),  # the shipped operating point (multilab-yolov8n-cpu's card)
    (["--conf", "0.3"], {"RBC": 0.3, "WBC": 0.3, "Platelets": 0.3}),  # --conf alone: one threshold for all
    (["--conf", "0.3", "--set", "class_conf=Platelets=0.7"], {"RBC": 0.3, "WBC": 0.3, "Platelets": 0.7}),
    (["--set", "conf=0.3"], {"RBC": 0.3, "WBC": 0.3, "Platelets": 0.3}),  # as --conf
    # another detector brings its own operating point, from its card
    (["--set", "detector_weights=detector/models/bccd-chula-yolov8n"], {"RBC": 0.4, "WBC": 0.4, "Platelets": 0.55}),
    (["--set", "detector_weights=detector/models/bccd-chula-yolov8n", "--set", "class_conf=[detector,RBC=0.3]"],
     {"RBC": 0.3, "WBC": 0.4, "Platelets": 0.55}),
])
def test_analyze_conf_option_and_class_thresholds(tmp_path, analyzer_thresholds, extra, expected):
    r = invoke("analyze", _write_field(tmp_path / "f.png", 1), *extra)
    assert isinstance(r.exception, AnalyzerBuilt), r.output
    assert analyzer_thresholds["thresholds"] == expected
