"""Stain normalisation before detection: fields of a known lab untouched, others mapped onto the nearest lab."""

from __future__ import annotations

import numpy as np
import pytest

from smear.detector.stain import StainReference, lab_stats


def _fields(rng, tint, n=6):
    out = []
    for _ in range(n):
        img = rng.integers(0, 40, (60, 80, 3)).astype(np.int16) + np.array(tint, np.int16)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_a_field_like_a_training_lab_is_untouched_and_an_unlike_one_takes_the_nearest_labs_colours():
    rng = np.random.default_rng(0)
    ref = StainReference.from_images({"pinkish": _fields(rng, (200, 150, 170)), "purple": _fields(rng, (120, 90, 160))})
    known = _fields(rng, (200, 150, 170), 1)[0]
    same, lab = ref.normalise(known)
    assert lab is None and same is known
    blue = _fields(rng, (60, 90, 210), 1)[0]
    mapped, lab = ref.normalise(blue)
    assert lab in ("pinkish", "purple") and mapped.shape == blue.shape and mapped.dtype == np.uint8
    target = next(x for x in ref.labs if x.name == lab)
    assert lab_stats(mapped)[:3] == pytest.approx(np.array(target.mean[:3]), abs=3.0)  # the lab's mean colour
    assert ref.nearest(lab_stats(mapped))[1] < ref.nearest(lab_stats(blue))[1]


def test_reference_round_trips_through_the_card_and_refuses_another_method():
    rng = np.random.default_rng(1)
    ref = StainReference.from_images({"a": _fields(rng, (200, 150, 170)), "b": _fields(rng, (100, 100, 100))})
    assert StainReference.from_card({"stain_norm": ref.to_card()}) == ref
    assert StainReference.from_card({}) is None
    with pytest.raises(ValueError, match="not supported"):
        StainReference.from_card({"stain_norm": {**ref.to_card(), "method": "macenko"}})
    with pytest.raises(ValueError, match="at least 2"):
        StainReference.from_images({"a": _fields(rng, (1, 2, 3), 1)})


def test_detector_maps_only_when_asked_and_says_so(tmp_path, tiny_detector):
    import json
    import shutil

    from smear.detector.predict import Detector

    rng = np.random.default_rng(2)
    folder = tmp_path / "det"
    shutil.copytree(tiny_detector, folder)
    card = json.loads((folder / "card.json").read_text())
    card["stain_norm"] = StainReference.from_images({"pinkish": _fields(rng, (200, 150, 170))}).to_card()
    (folder / "card.json").write_text(json.dumps(card))
    blue = _fields(rng, (60, 90, 210), 1)[0]
    assert Detector(folder, threads=1).predict([blue], scale=1.0)[0].stain_mapped_to is None  # off by default
    assert Detector(folder, threads=1, stain_norm=True).predict([blue], scale=1.0)[0].stain_mapped_to == "pinkish"
