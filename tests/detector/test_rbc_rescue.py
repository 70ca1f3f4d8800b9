"""rbc_rescue: RBC boxes under the threshold kept only where they cover red-cell pixels no kept box covers."""

from __future__ import annotations

import numpy as np

from tests.conftest import draw_field


def detections(boxes, scores, classes):
    from smear.detector.predict import Detections

    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int64))


def test_a_low_box_over_an_unboxed_cell_is_kept_and_one_over_a_boxed_cell_or_background_is_not():
    from smear.detector.coverage import rbc_coverage, rescue_rbcs

    image, boxes = draw_field(seed=3, n_rbc=3, n_wbc=0, n_plt=0)
    rbcs = [b for g, b in boxes if g == "RBC"]
    kept = detections([rbcs[0]], [0.9], [0])
    x1, y1, x2, y2 = rbcs[0]
    low = detections([rbcs[1], (x1 + 3, y1 + 2, x2 + 3, y2 + 2), (0, 0, 12, 12)], [0.3, 0.35, 0.2], [0, 0, 0])
    taken = rescue_rbcs(image, kept, low, target=1.01)
    assert taken.boxes.tolist() == [list(map(float, rbcs[1]))]
    before = rbc_coverage(image, kept.boxes, kept.classes)
    after = rbc_coverage(image, np.concatenate([kept.boxes, taken.boxes]), np.r_[kept.classes, taken.classes])
    assert after > before


def test_rescue_stops_once_the_field_is_covered_to_the_target():
    from smear.detector.coverage import rbc_coverage, rescue_rbcs

    image, boxes = draw_field(seed=3, n_rbc=3, n_wbc=0, n_plt=0)
    rbcs = [b for g, b in boxes if g == "RBC"]
    kept = detections(rbcs[:2], [0.9, 0.9], [0, 0])
    low = detections([rbcs[2]], [0.3], [0])
    covered = rbc_coverage(image, kept.boxes, kept.classes)
    assert len(rescue_rbcs(image, kept, low, target=covered - 0.01)) == 0
    assert len(rescue_rbcs(image, kept, low, target=covered + 0.05)) == 1


def test_pixels_of_a_wbc_are_no_red_cell_pixels_to_fill():
    from smear.detector.coverage import rescue_rbcs

    image, boxes = draw_field(seed=5, n_rbc=0, n_wbc=1, n_plt=0)
    wbc = boxes[0][1]
    kept = detections([wbc], [0.9], [1])
    low = detections([wbc], [0.3], [0])  # an RBC box over the WBC the detector kept
    assert len(rescue_rbcs(image, kept, low, target=1.01)) == 0


def test_low_rbc_candidates_split_by_score_and_keep_other_groups():
    from smear.detector.coverage import RBC_RESCUE_MIN_SCORE, low_rbc_candidates

    det = detections([(0, 0, 10, 10)] * 5, [0.9, 0.3, RBC_RESCUE_MIN_SCORE / 2, 0.3, 0.1], [0, 0, 0, 1, 2])
    kept, low = low_rbc_candidates(det, 0.4)
    assert kept.scores.tolist() == [np.float32(0.9), np.float32(0.3), np.float32(0.1)]
    assert kept.classes.tolist() == [0, 1, 2] and low.scores.tolist() == [np.float32(0.3)]
