"""Batch-norm statistics of a detector re-estimated on a lab's own fields (AdaBN), weights left as they were: measured
in benchmarks/detector_sources.py --adapt-from (docs/models.md), not a command (it failed its rule)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, draw_field, requires_shared_data


def _state(folder):
    import torch

    return torch.load(folder / "weights.pt", weights_only=False, map_location="cpu")["model"].float().state_dict()


def _write_fields(folder, n, seed=0, tint=(0, 0, 0)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.clip(draw_field(seed=seed + i, size=(320, 256))[0].astype(int) + tint, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"f{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def test_adapt_changes_only_batchnorm_statistics(tiny_detector, tmp_path):
    from smear.data.images import read_image
    from smear.detector.adapt import recalibrate_batchnorm

    fields = _write_fields(tmp_path / "lab", 3)
    out = recalibrate_batchnorm(tiny_detector, (read_image(p) for p in sorted(fields.iterdir())), tmp_path / "adapted",
                                scale=1.0, min_inputs=16)
    base, new = _state(tiny_detector), _state(out)
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in base if k.endswith((".weight", ".bias")) and base[k].is_floating_point()]
    assert stats and weights
    assert all(torch_equal(base[k], new[k]) for k in weights)  # no learned weight moves
    assert sum(not torch_equal(base[k], new[k]) for k in stats) == len(stats)  # every statistic is re-estimated
    card = json.loads((out / "card.json").read_text())
    assert card["batchnorm_adaptation"]["fields"] == 3 and card["batchnorm_adaptation"]["layers"] == len(stats) // 2
    assert card["classes"] == ["RBC", "WBC", "Platelets"] and card["rbc_median_diameter_px"] == 100
    from smear.detector.predict import Detector

    assert len(Detector(out).predict([draw_field(seed=9)[0]])) == 1  # loads and runs like any detector


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-3, rtol=1e-3))


def test_adapt_statistics_follow_the_lab_fields(tiny_detector, tmp_path):
    from smear.data.images import read_image
    from smear.detector.adapt import recalibrate_batchnorm

    means = []
    for name, tint in (("pale", (40, 40, 40)), ("blue", (-60, -20, 50))):
        fields = _write_fields(tmp_path / name, 2, tint=tint)
        out = recalibrate_batchnorm(tiny_detector, (read_image(p) for p in sorted(fields.iterdir())), tmp_path /
                                    f"{name}-model", scale=1.0, min_inputs=16)
        means.append(_state(out)["model.0.bn.running_mean"])
    assert not torch_equal(means[0], means[1])  # the first layer's statistics are those of the fields given


def test_adapt_refuses_no_fields(tiny_detector, tmp_path):
    from smear.configs.errors import SmearError
    from smear.detector.adapt import recalibrate_batchnorm

    with pytest.raises(SmearError, match="no field"):
        recalibrate_batchnorm(tiny_detector, iter([]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@requires_shared_data
def test_adapt_on_the_training_lab_leaves_counts_as_they_were(tmp_path):
    """In-domain, re-estimated statistics must leave the shipped detector's counts about where they were (fields fed
    as at inference instead of through the training transforms lost half the RBCs)."""
    from smear.data.images import read_image
    from smear.detector.adapt import recalibrate_batchnorm
    from smear.detector.predict import Detector

    names = (SHARED_DATA / "bccd" / "ImageSets" / "Main" / "val.txt").read_text().split()
    field = lambda n: read_image(SHARED_DATA / "bccd" / "JPEGImages" / f"{n}.jpg")  # noqa: E731
    out = recalibrate_batchnorm(None, (field(n) for n in names[:16]), tmp_path / "bccd", min_inputs=32)
    base, adapted = Detector(), Detector(out)
    thresholds = base.info.card["operating_thresholds"]
    counts = [sum(int((d.predict([field(n)], conf=thresholds, scale="auto")[0].classes == 0).sum()) for n in
                  names[16:22]) for d in (base, adapted)]
    assert counts[0] > 60 and abs(counts[1] - counts[0]) <= 0.15 * counts[0], counts
