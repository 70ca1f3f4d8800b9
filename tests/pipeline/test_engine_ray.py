"""``smear analyze --engine ray``: the same output folder as the local engine, byte for byte, on one local cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import pytest
from conftest import draw_field
from typer.testing import CliRunner

from smear.pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]
SAME_FILES = ("results.jsonl", "summary.csv", "slides.json", "slides.csv")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'smear[ray]')")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="session")
def ray_cluster():
    """One local two-CPU cluster for the whole session; the engine joins it and leaves it running."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def analyze_args(tiny_detector, tiny_classifier) -> list[str]:
    return ["--set", f"detector_weights={tiny_detector}", "--set", f"classifier_weights={tiny_classifier}",
            "--set", "morphology_weights=none", "--set", "threads=1", "--set", "batch=2", "--conf", "0.0001"]


def _slides(root: Path) -> Path:
    """Two slides of drawn fields (A: 3 and a broken file, B: 2), so detector batches straddle slides and failures."""
    for slide, seeds in (("A", (1, 2, 3)), ("B", (4, 5))):
        for seed in seeds:
            img, _ = draw_field(seed=seed)
            (root / slide).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / slide / f"f{seed}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "A" / "f2b.jpg").write_bytes(b"not an image")
    return root


def _assert_same_outputs(local: Path, ray: Path) -> None:
    for name in SAME_FILES:
        assert (local / name).read_bytes() == (ray / name).read_bytes(), name
    assert sorted(p.name for p in (local / "overlays").iterdir()) == sorted(p.name for p in (ray / "overlays").iterdir())
    for p in (local / "overlays").iterdir():  # drawn by the actors, byte for byte the local engine's
        assert p.read_bytes() == (ray / "overlays" / p.name).read_bytes(), p.name
    runs = [json.loads((d / "run.json").read_text()) for d in (local, ray)]
    assert [{k: v for k, v in r.items() if k != "date"} for r in runs][0] == \
        [{k: v for k, v in r.items() if k != "date"} for r in runs][1]  # the actors' provenance: same models, settings
    assert sorted(p.name for p in (local / "fields").iterdir()) == sorted(p.name for p in (ray / "fields").iterdir())
    assert (ray / "report.html").is_file() and (ray / "run.json").is_file()


@needs_ray
def test_ray_engine_writes_the_local_engines_outputs(tmp_path, analyze_args, ray_cluster):
    inputs = _slides(tmp_path / "in")
    missing = tmp_path / "gone.png"
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        r = invoke("analyze", inputs, missing, *analyze_args, "--output", outs[engine], "--engine", engine)
        assert r.exit_code == 1, r.output  # the broken and the missing file
        assert "2 of 7 file(s) failed" in r.stderr and "f2b.jpg" in r.stderr and "gone.png" in r.stderr
    _assert_same_outputs(outs["local"], outs["ray"])
    records = [json.loads(line) for line in (outs["ray"] / "results.jsonl").read_text().splitlines()]
    assert [r["slide"] for r in records] == ["A"] * 4 + ["B"] * 2 + ["all"]
    assert [bool(r["error"]) for r in records] == [False, False, True, False, False, False, True]
    assert len(list((outs["ray"] / "overlays").iterdir())) == 5

    # --resume with the ray engine: the kept records are not sent to the actors, the folder ends the same
    cut = tmp_path / "cut"
    shutil.copytree(outs["local"], cut)
    lines = (cut / "results.jsonl").read_text().splitlines(keepends=True)
    (cut / "results.jsonl").write_text("".join(lines[:3]) + lines[3][:50])  # killed while writing the fourth
    r = invoke("analyze", inputs, missing, *analyze_args, "--output", cut, "--resume", "--engine", "ray")
    assert r.exit_code == 1, r.output
    assert "resumed: 3 of 7 field(s) kept" in r.stderr
    _assert_same_outputs(outs["local"], cut)
    assert not (cut / "results.previous.jsonl").exists()


@needs_ray
@pytest.mark.skipif(not list((ROOT / "data" / "samples").glob("*.jpg")), reason="no shipped sample fields")
def test_ray_engine_with_the_shipped_models_on_the_samples(tmp_path, ray_cluster):
    """The real models on ONNX Runtime: two one-thread actors against the local engine's two threads, the same
    records to the digit."""
    inputs = tmp_path / "in"
    for slide, names in (("S1", ["BloodImage_00007.jpg", "BloodImage_00021.jpg"]), ("S2", ["BloodImage_00041.jpg"])):
        (inputs / slide).mkdir(parents=True)
        for name in names:
            shutil.copy(ROOT / "data" / "samples" / name, inputs / slide / name)
    (inputs / "S2" / "cut.jpg").write_bytes((ROOT / "data" / "samples" / "BloodImage_00041.jpg").read_bytes()[:300])
    outs = {e: tmp_path / e for e in ("local", "ray")}
    for engine, out in outs.items():
        r = invoke("analyze", inputs, "--set", "batch=2", "--output", out, "--no-fields", "--engine", engine)
        assert r.exit_code in (0, 1), r.output
    for name in SAME_FILES:
        assert (outs["local"] / name).read_bytes() == (outs["ray"] / name).read_bytes(), name
    assert sorted(os.listdir(outs["local"] / "overlays")) == sorted(os.listdir(outs["ray"] / "overlays"))
    assert [s["slide"] for s in json.loads((outs["ray"] / "slides.json").read_text())] == ["S1", "S2"]


@needs_ray
def test_ray_engine_actor_that_cannot_load_its_models_is_one_line(tmp_path, analyze_args, ray_cluster):
    """The driver loads no model: a model the actors cannot load is still smear's one-line error, nothing written."""
    img, _ = draw_field(seed=1)
    field = tmp_path / "f.png"
    cv2.imwrite(str(field), img)
    bad = tmp_path / "bad-classifier"
    shutil.copytree(analyze_args[analyze_args.index("--set") + 3].split("=", 1)[1], bad)
    (bad / "weights.pt").write_bytes(b"not weights")
    args = [a if not a.startswith("classifier_weights=") else f"classifier_weights={bad}" for a in analyze_args]
    r = invoke("analyze", field, *args, "--output", tmp_path / "out", "--engine", "ray")
    # the actor's own SmearError, out of Ray's wrappers: main() prints it as one line
    assert type(r.exception).__name__ == "SmearError", repr(r.exception)
    assert "weights.pt" in str(r.exception) and "\n" not in str(r.exception)
    assert "Traceback" not in r.stderr and "stack trace" not in r.stderr, r.stderr  # Ray's logs stay quiet
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_actor_threads_one_per_actor_on_onnx_the_local_count_on_torch(monkeypatch):
    from smear.pipeline.config import PipelineConfig
    from smear.pipeline.engine_ray import actor_threads, pool_size

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert actor_threads(PipelineConfig()) == (1, 16)  # onnx: 16 one-thread actors; a torch fallback gets 16
    assert pool_size(16, actor_threads(PipelineConfig())[0]) == 16
    assert actor_threads(PipelineConfig(runtime="torch")) == (16, 16)  # the local engine's sums
    assert actor_threads(PipelineConfig(threads=4)) == (4, 4)  # what the settings say


def test_engine_ray_without_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch, analyze_args):
    img, _ = draw_field(seed=1)
    field = tmp_path / "f.png"
    cv2.imwrite(str(field), img)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = invoke("analyze", field, *analyze_args, "--engine", "ray")
    assert r.exit_code == 1
    assert "pip install 'smear[ray]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not r.stdout


def test_unknown_engine_and_stray_address(tmp_path, analyze_args):
    img, _ = draw_field(seed=1)
    field = tmp_path / "f.png"
    cv2.imwrite(str(field), img)
    r = invoke("analyze", field, *analyze_args, "--engine", "spark")
    assert r.exit_code == 1 and "choose local or ray" in r.stderr
    r = invoke("analyze", field, *analyze_args, "--ray-address", "h:6379")
    assert r.exit_code == 1 and "--ray-address goes with --engine ray" in r.stderr
