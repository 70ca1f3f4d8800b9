"""``smear analyze --resume``: the records a killed run already wrote, kept for the files that did not change.

The previous ``results.jsonl`` is moved aside to ``results.previous.jsonl`` (merged with one left there by an
earlier interrupted resume); a cut last line is dropped. The new run writes every record again in input order, taking
a kept record instead of analysing a field whose path and SHA-256 match, so the resumed folder holds each input once
and is the same as an uninterrupted run's. The aside file is removed when the run finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import atomic_open
from .results import ImageResult

RESULTS = "results.jsonl"
PREVIOUS = "results.previous.jsonl"


def _records(path: Path):
    """``(image, sha256, line)`` of each whole, valid record line of a results file (a cut or garbled line is
    skipped: it was being written when the run was killed)."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("image"), str):
                yield rec["image"], rec.get("sha256"), raw


class PreviousRecords:
    """The records of an earlier run in ``out``, looked up by image path and file hash (offsets only in memory)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / PREVIOUS
        latest: dict[str, tuple[str | None, bytes]] = {}
        for source in (self.path, self.out / RESULTS):  # a later line for the same image wins
            for image, sha256, raw in _records(source):
                latest[image] = (sha256, raw)
        self._index: dict[str, tuple[int, str | None]] = {}
        if latest:
            with atomic_open(self.path) as f:
                offset = 0
                for image, (sha256, raw) in latest.items():
                    f.write(raw)
                    self._index[image] = (offset, sha256)
                    offset += len(raw)
        elif self.path.exists():
            self.path.unlink()
        (self.out / RESULTS).unlink(missing_ok=True)  # the kept records are in PREVIOUS now
        self._file = open(self.path, "rb") if self._index else None
        self.used = 0

    def __len__(self) -> int:
        return len(self._index)

    def matches(self, image: str, sha256: str | None) -> bool:
        """Whether :meth:`lookup` would return a record (nothing read, nothing counted): ``--engine ray`` sends
        only the other fields to its actors, and looks the kept ones up when their turn comes."""
        hit = self._index.get(image)
        return hit is not None and sha256 is not None and hit[1] == sha256 and self._file is not None

    def lookup(self, image: str, sha256: str | None) -> ImageResult | None:
        """The earlier record of ``image`` when the file's hash is the one it was analysed with, else None."""
        if not self.matches(image, sha256):
            return None
        self._file.seek(self._index[image][0])
        self.used += 1
        return ImageResult.from_dict(json.loads(self._file.readline()))

    def finish(self) -> None:
        """The new results.jsonl is complete: drop the aside file."""
        if self._file:
            self._file.close()
        self.path.unlink(missing_ok=True)
