"""The records an interrupted run left, as --resume reads them: cut lines dropped, changed files re-analysed."""

from __future__ import annotations

import json

from smear.pipeline.results import Cell, Flag, ImageResult
from smear.pipeline.resume import PREVIOUS, RESULTS, PreviousRecords


def _record(image: str, sha: str, n_cells: int = 2) -> ImageResult:
    cells = [Cell(box=[1.0 * i, 2.0, 30.0, 40.0], group="RBC", label="RBC", score=0.9, detector={"class": "RBC"},
                  classifier={"label": "RBC", "score": 0.8}) for i in range(n_cells)]
    flag = Flag(name="x", severity="warning", rule="r", threshold=1, observed=2, evidence={"n": 1}, caveat="c")
    return ImageResult(image=image, sha256=sha, width=640, height=480, cells=cells, counts={"RBC": n_cells},
                       flags=[flag], slide="s", warnings=["w"])


def test_record_round_trips_through_its_dict():
    r = _record("a.jpg", "aa")
    assert ImageResult.from_dict(json.loads(json.dumps(r.to_dict()))).to_dict() == r.to_dict()


def test_previous_records_drop_a_cut_line_and_refuse_a_changed_file(tmp_path):
    lines = [json.dumps(_record(f"{i}.jpg", f"h{i}").to_dict()) + "\n" for i in range(3)]
    (tmp_path / RESULTS).write_text("".join(lines[:2]) + lines[2][:40])  # killed while writing the third
    prev = PreviousRecords(tmp_path)
    assert len(prev) == 2
    assert not (tmp_path / RESULTS).exists() and (tmp_path / PREVIOUS).exists()
    assert prev.lookup("0.jpg", "h0").to_dict() == _record("0.jpg", "h0").to_dict()
    assert prev.lookup("1.jpg", "changed") is None  # same path, other bytes: analysed again
    assert prev.lookup("2.jpg", "h2") is None  # its line was cut
    assert prev.lookup("0.jpg", None) is None  # a file that cannot be read now
    prev.finish()
    assert not (tmp_path / PREVIOUS).exists()


def test_an_interrupted_resume_keeps_both_files_records(tmp_path):
    """Killed again while resuming: the aside file and the new partial results.jsonl are merged, newest wins."""
    (tmp_path / PREVIOUS).write_text(json.dumps(_record("0.jpg", "old").to_dict()) + "\n"
                                     + json.dumps(_record("1.jpg", "h1").to_dict()) + "\n")
    (tmp_path / RESULTS).write_text(json.dumps(_record("0.jpg", "new").to_dict()) + "\n")
    prev = PreviousRecords(tmp_path)
    assert len(prev) == 2
    assert prev.lookup("0.jpg", "new") is not None and prev.lookup("0.jpg", "old") is None
    assert prev.lookup("1.jpg", "h1") is not None


def test_nothing_to_resume_is_a_fresh_run(tmp_path):
    prev = PreviousRecords(tmp_path)
    assert len(prev) == 0 and prev.lookup("a.jpg", "h") is None
    prev.finish()
    assert list(tmp_path.iterdir()) == []
