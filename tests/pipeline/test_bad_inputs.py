"""Every kind of bad input, each a real file, through 'smear analyze': one line naming the file and the problem,
no traceback, the rest of the batch analysed, exit 1 when something failed. The closing table of issue 24 is
this file's KINDS."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import draw_field
from typer.testing import CliRunner

from smear.pipeline.cli import app, main

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The console entry point as a user runs it (a SmearError is one line there): exit code, stdout, stderr."""
    import sys

    monkeypatch.setattr(sys, "argv", ["smear", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return int(stop.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_args(tiny_detector, tiny_classifier) -> list[str]:
    return ["--set", f"detector_weights={tiny_detector}", "--set", f"classifier_weights={tiny_classifier}",
            "--set", "morphology_weights=none", "--set", "threads=1", "--conf", "0.0001", "--scale", "1"]


def _field() -> np.ndarray:
    return cv2.cvtColor(draw_field(seed=4, size=(320, 240), n_rbc=4)[0], cv2.COLOR_RGB2BGR)


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _cut(path: Path, img: np.ndarray, suffix: str) -> Path:
    whole = _write(path.with_suffix(".whole" + suffix), img)
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    whole.unlink()
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _huge_png(path: Path) -> Path:
    """A valid PNG header and one tiny IDAT claiming 100,000 x 100,000 pixels (30 GB decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _pil(path: Path, mode: str, **save) -> Path:
    from PIL import Image

    img = Image.fromarray(cv2.cvtColor(_field(), cv2.COLOR_BGR2RGB))
    img = img.convert(mode) if mode != "P" else img.quantize(64)
    img.save(path, **save)
    return path


def _exif_rotated(path: Path) -> Path:
    from PIL import Image

    img = Image.fromarray(cv2.cvtColor(_field(), cv2.COLOR_BGR2RGB))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(path, exif=exif)
    return path


def _pages(path: Path) -> Path:
    assert cv2.imwritemulti(str(path), [_field()] * 3)
    return path


def _symlink_loop(folder: Path) -> Path:
    _write(folder / "inner" / "field.png", _field())
    os.symlink(folder, folder / "inner" / "loop")
    return folder


# kind -> (make(tmp) -> path, outcome, what the one line (error) or warning must say)
KINDS = {
    "truncated JPEG": (lambda t: _cut(t / "cut.jpg", _field(), ".jpg"), "warning", "truncated JPEG"),
    "truncated PNG": (lambda t: _cut(t / "cut.png", _field(), ".png"), "error", "truncated PNG"),
    "zero-byte file": (lambda t: _bytes(t / "empty.jpg", b""), "error", "empty file"),
    "text named .jpg": (lambda t: _bytes(t / "notes.jpg", b"not an image\n"), "error", "cannot decode"),
    "random bytes named .png": (lambda t: _bytes(t / "noise.png", os.urandom(4096)), "error", "cannot decode"),
    "missing file": (lambda t: t / "nowhere.png", "error", "file not found"),
    "header claiming 100,000 x 100,000 pixels": (lambda t: _huge_png(t / "bomb.png"), "error", "image too large"),
    "grayscale PNG": (lambda t: _write(t / "gray.png", cv2.cvtColor(_field(), cv2.COLOR_BGR2GRAY)), "ok", ""),
    "RGBA PNG": (lambda t: _write(t / "rgba.png", cv2.cvtColor(_field(), cv2.COLOR_BGR2BGRA)), "ok", ""),
    "16-bit PNG": (lambda t: _write(t / "deep.png", _field().astype(np.uint16) * 257), "ok", ""),
    "16-bit TIFF": (lambda t: _write(t / "deep.tif", _field().astype(np.uint16) * 257), "ok", ""),
    "CMYK JPEG": (lambda t: _pil(t / "cmyk.jpg", "CMYK"), "ok", ""),
    "palette PNG": (lambda t: _pil(t / "palette.png", "P"), "ok", ""),
    "multi-page TIFF": (lambda t: _pages(t / "pages.tif"), "warning", "TIFF with 3 pages"),
    "8x8 image": (lambda t: _write(t / "tiny.png", cv2.resize(_field(), (8, 8))), "ok", ""),
    "EXIF-rotated JPEG": (lambda t: _exif_rotated(t / "rotated.jpg"), "ok", ""),
    "unicode and spaces in the path": (lambda t: _write(t / "lame ü 標本" / "champ 1.png", _field()), "ok", ""),
    "symlink loop in a folder": (lambda t: _symlink_loop(t / "looped"), "ok", ""),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_kind_in_a_batch(tmp_path, tiny_args, kind):
    make, outcome, says = KINDS[kind]
    good = _write(tmp_path / "in" / "good.png", _field())
    (tmp_path / "in" / "bad").mkdir()
    bad = make(tmp_path / "in" / "bad")
    out = tmp_path / "out"
    r = invoke("analyze", good, bad, *tiny_args, "--output", out)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records[0]["image"] == str(good) and records[0]["error"] is None  # the rest of the batch is analysed
    bad_records = records[1:]
    assert bad_records, "the bad input left no record"
    if outcome == "error":
        assert r.exit_code == 1, r.output
        (record,) = bad_records
        assert says in record["error"] and Path(bad).name in record["error"]
        failed = [line for line in r.stderr.splitlines() if Path(bad).name in line]
        assert failed and all(says in line for line in failed)  # one line naming the file and the problem
    else:
        assert r.exit_code == 0, r.output
        assert all(rec["error"] is None for rec in bad_records)
        if outcome == "warning":
            assert any(says in w and Path(bad).name in w for rec in bad_records for w in rec["warnings"])
    if kind == "EXIF-rotated JPEG":
        assert (bad_records[0]["width"], bad_records[0]["height"]) == (240, 320)  # shown upright


def test_a_folder_without_images_is_named_and_the_rest_analysed(tmp_path, tiny_args):
    good = _write(tmp_path / "good.png", _field())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    r = invoke("analyze", good, tmp_path / "empty", *tiny_args, "--output", tmp_path / "out")
    assert "Traceback" not in r.output
    assert r.exit_code == 1 and "empty" in r.stderr and "no images" in r.stderr, r.output
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["error"] is None for r in records] == [True, False]
    assert "a folder with no images" in records[1]["error"]


def _not_weights(path: Path) -> Path:
    """A pickle whose loading would call a function (os.system): weights_only loading must refuse it."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unpickled > /dev/null",))

    path.write_bytes(pickle.dumps({"model": Evil()}))
    return path


def _card_for(tmp_path: Path, tiny_classifier: Path, backbone: str) -> Path:
    import shutil

    folder = tmp_path / "other-arch"
    shutil.copytree(tiny_classifier, folder)
    card = json.loads((folder / "card.json").read_text())
    card["config"]["backbone"] = backbone
    (folder / "card.json").write_text(json.dumps(card))
    return folder


# kind -> (the --set/--config arguments, made from tmp_path and the tiny models; what the line must say)
SETUP_KINDS = {
    "detector weights missing": (lambda t, d, c: ["--set", f"detector_weights={t / 'gone.pt'}"], "gone.pt"),
    "detector weights corrupt": (lambda t, d, c: ["--set", f"detector_weights={_bytes(t / 'corrupt.pt', os.urandom(2048))}"],
                                 "corrupt.pt"),
    "a pickle that is not weights": (lambda t, d, c: ["--set", f"detector_weights={_not_weights(t / 'evil.pt')}"],
                                     "evil.pt"),
    "classifier folder missing": (lambda t, d, c: ["--set", f"classifier_weights={t / 'no-model'}"], "no-model"),
    "classifier card for another architecture": (
        lambda t, d, c: ["--set", f"classifier_weights={_card_for(t, c, 'efficientnet_lite0')}"], "other-arch"),
    "config: bad YAML": (lambda t, d, c: ["--config", str(_bytes(t / "bad.yaml", b"conf: [0.4\n"))], "bad.yaml"),
    "config: unknown key": (lambda t, d, c: ["--set", "confidence=0.4"], "confidence"),
    "config: wrong type": (lambda t, d, c: ["--set", "batch=many"], "batch"),
    "config: out-of-range value": (lambda t, d, c: ["--set", "iou=7"], "iou"),
    "device without hardware": (lambda t, d, c: ["--device", "cuda:3"], "cuda"),
}


@pytest.mark.parametrize("kind", list(SETUP_KINDS))
def test_bad_models_and_settings_are_one_line_before_anything_is_written(tmp_path, tiny_args, tiny_detector,
                                                                         tiny_classifier, kind, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make, says = SETUP_KINDS[kind]
    good = _write(tmp_path / "good.png", _field())
    code, out, err = run_main(monkeypatch, capsys, "analyze", good, *tiny_args,
                              *make(tmp_path, tiny_detector, tiny_classifier), "--output", tmp_path / "out")
    assert "Traceback" not in out + err
    assert code in (1, 2), out + err
    message = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    assert len(message) == 1 and says in message[0], err
    assert not (tmp_path / "out" / "results.jsonl").exists()
