"""A bad detector weights file is one line naming the file and what to do, never a traceback."""

from __future__ import annotations

import json
import pickle

import pytest

from smear.configs.errors import SmearError


@pytest.mark.parametrize("content", [b"", b"\x80\x04 truncated", pickle.dumps({"not": "weights"}),
                                     b"PK\x03\x04 half a zip"])
def test_corrupt_detector_weights_are_one_line(tmp_path, tiny_detector, content):
    from smear.detector.predict import Detector

    folder = tmp_path / "det"
    folder.mkdir()
    (folder / "card.json").write_text((tiny_detector / "card.json").read_text())
    (folder / "weights.pt").write_bytes(content + (tiny_detector / "weights.pt").read_bytes()[:200] * bool(content))
    with pytest.raises(SmearError) as e:
        Detector(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 'weights.pt'}: cannot be read as YOLO detector weights") and "\n" not in msg
    assert "smear detector train" in msg


def test_corrupt_classifier_weights_are_one_line(tmp_path, tiny_classifier):
    from smear.classifier.model import load_classifier

    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "card.json").write_text(json.dumps(json.loads((tiny_classifier / "card.json").read_text())))
    (folder / "weights.pt").write_bytes((tiny_classifier / "weights.pt").read_bytes()[:500])
    with pytest.raises(SmearError, match="cannot load as a weights-only state dict") as e:
        load_classifier(folder)
    assert "\n" not in str(e.value) and "smear classifier train" in str(e.value)
