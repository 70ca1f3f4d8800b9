"""The review's storage: ``OUT/review.sqlite`` (WAL), filled once from ``OUT/results.jsonl``.

Every correction is one transaction (the cell's new label and its audit row together), committed before the API
answers, so a correction acknowledged with 200 survives a killed server, and two tabs on one slide each write their
own cells without losing the other's. A slide's status is ``new`` until its first call is corrected or accepted,
then ``in review``, then ``signed off``.

Corrected counts, differential and flags are recomputed from the corrected calls with the pipeline's own rules
(``smear.pipeline.analyze.slide_from_totals``), with the analysis run's settings (``OUT/run.json``).
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from smear.configs.errors import SmearError
from smear.data.taxonomy import CELL_CLASSES, GROUPS, group_of

from ..results import Cell, ImageResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS fields (field INTEGER PRIMARY KEY, slide TEXT NOT NULL, image TEXT NOT NULL,
    file TEXT, overlay TEXT, width INTEGER, height INTEGER, rbc_coverage REAL, error TEXT);
CREATE TABLE IF NOT EXISTS cells (id INTEGER PRIMARY KEY, field INTEGER NOT NULL, slide TEXT NOT NULL,
    x1 REAL, y1 REAL, x2 REAL, y2 REAL, grp TEXT NOT NULL, label TEXT NOT NULL, score REAL,
    score_in_group REAL, review INTEGER NOT NULL, record TEXT NOT NULL,
    corrected_label TEXT, accepted INTEGER NOT NULL DEFAULT 0, updated TEXT);
CREATE INDEX IF NOT EXISTS cells_slide ON cells (slide);
CREATE TABLE IF NOT EXISTS slides (slide TEXT PRIMARY KEY, position INTEGER, status TEXT NOT NULL DEFAULT 'new',
    reviewer TEXT, signed_at TEXT);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, cell INTEGER NOT NULL, slide TEXT NOT NULL,
    from_label TEXT NOT NULL, to_label TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

#: A cell as the page lists it; ``below_threshold`` (kept though the detector scored it under its threshold:
#: ``wbc_rescue``, ``rbc_rescue``) is read from the stored record by SQLite itself, not by parsing each record in Python
CELL_COLUMNS = ("c.id, c.field, c.x1, c.y1, c.x2, c.y2, c.grp, c.label, c.score, c.score_in_group, c.review, "
                "c.corrected_label, c.accepted, f.image AS image, f.file AS file, f.overlay AS overlay, "
                "COALESCE(json_extract(c.record, '$.detector.below_threshold'), 0) AS below_threshold")

#: Labels a reviewer may give: every cell class smear names, and ``WBC`` for "a WBC, subtype unsure"
REVIEW_LABELS = (*CELL_CLASSES, "WBC")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ReviewStore:
    """One analysis folder's review state. Thread-safe: one connection per thread, WAL journal."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        results = self.out / "results.jsonl"
        if not results.is_file():
            raise SmearError(f"{self.out}: no results.jsonl; run 'smear analyze ... --output {self.out}' first")
        self.path = self.out / "review.sqlite"
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent; executescript runs outside a transaction
        if not self._one("SELECT value FROM meta WHERE key = 'imported'"):
            self._import(results)

    # ------------------------------------------------------------ connection

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a 200 means the correction is on disk
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> _Tx:
        return self._Tx(self._db())

    def _one(self, sql: str, *args) -> Any:
        row = self._db().execute(sql, args).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------ import

    def _import(self, results: Path) -> None:
        """Fields and cells from results.jsonl (record order = the overlays' and fields' index)."""
        from ..report import field_name, overlay_name

        with self.transaction() as db, open(results) as f:
            slides: dict[str, int] = {}
            for index, line in enumerate(f):
                rec = json.loads(line)
                result = ImageResult(image=rec["image"])
                slide = rec.get("slide") or "slide"
                slides.setdefault(slide, len(slides))
                file = field_name(result, index)
                overlay = overlay_name(result, index)
                db.execute("INSERT INTO fields VALUES (?,?,?,?,?,?,?,?,?)",
                           (index, slide, rec["image"], file if (self.out / "fields" / file).is_file() else None,
                            overlay if (self.out / "overlays" / overlay).is_file() else None, rec.get("width"),
                            rec.get("height"), rec.get("rbc_coverage"), rec.get("error")))
                for c in rec.get("cells") or []:
                    x1, y1, x2, y2 = c["box"]
                    db.execute("INSERT INTO cells (field, slide, x1, y1, x2, y2, grp, label, score, score_in_group, "
                               "review, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               (index, slide, x1, y1, x2, y2, c["group"], c["label"], c.get("score"),
                                (c.get("classifier") or {}).get("score_in_group"), int(bool(c.get("review"))),
                                json.dumps(c)))
            db.executemany("INSERT OR IGNORE INTO slides (slide, position) VALUES (?, ?)", slides.items())
            db.execute("INSERT INTO meta VALUES ('imported', ?)", (now(),))

    # ------------------------------------------------------------ reads

    def slides(self) -> list[dict]:
        rows = self._db().execute(
            "SELECT s.slide, s.status, s.reviewer, s.signed_at, COUNT(c.id) AS cells, "
            "SUM(c.corrected_label IS NOT NULL AND c.corrected_label != c.label) AS corrected, "
            "(SELECT COUNT(*) FROM fields f WHERE f.slide = s.slide) AS fields "
            "FROM slides s LEFT JOIN cells c ON c.slide = s.slide GROUP BY s.slide ORDER BY s.position").fetchall()
        return [{**dict(r), "corrected": r["corrected"] or 0} for r in rows]

    def slide(self, slide: str) -> dict | None:
        row = self._db().execute("SELECT * FROM slides WHERE slide = ?", (slide,)).fetchone()
        return dict(row) if row else None

    def cells(self, slide: str) -> list[dict]:
        rows = self._db().execute(
            f"SELECT {CELL_COLUMNS} FROM cells c JOIN fields f ON f.field = c.field WHERE c.slide = ? ORDER BY c.id",
            (slide,)).fetchall()
        return [self._cell_dict(r) for r in rows]

    def cell(self, cell_id: int) -> dict | None:
        row = self._db().execute(f"SELECT {CELL_COLUMNS} FROM cells c JOIN fields f ON f.field = c.field "
                                 "WHERE c.id = ?", (cell_id,)).fetchone()
        return self._cell_dict(row) if row else None

    @staticmethod
    def _cell_dict(r: sqlite3.Row) -> dict:
        return {"id": r["id"], "field": r["field"], "image": Path(r["image"]).name, "box": [r["x1"], r["y1"], r["x2"],
                r["y2"]], "group": r["grp"], "label": r["label"], "score": r["score"],
                "score_in_group": r["score_in_group"], "review": bool(r["review"]),
                # kept on the classifier's word though the detector scored it under its threshold (wbc_rescue)
                "below_threshold": bool(r["below_threshold"]),
                "corrected_label": r["corrected_label"], "accepted": bool(r["accepted"]),
                "final_label": r["corrected_label"] or r["label"], "file": r["file"], "overlay": r["overlay"]}

    def field(self, field: int) -> dict | None:
        row = self._db().execute("SELECT * FROM fields WHERE field = ?", (field,)).fetchone()
        return dict(row) if row else None

    def audit(self, slide: str) -> list[dict]:
        rows = self._db().execute("SELECT cell, from_label, to_label, time FROM audit WHERE slide = ? ORDER BY id",
                                  (slide,)).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ writes

    def correct(self, cell_id: int, label: str | None) -> dict:
        """Set a cell's label (``None``: accept the call as it stands). One transaction with its audit row."""
        if label is not None and label not in REVIEW_LABELS:
            raise ValueError(f"unknown label {label!r}; labels: {', '.join(REVIEW_LABELS)}")
        with self.transaction() as db:
            row = db.execute("SELECT slide, label, corrected_label FROM cells WHERE id = ?", (cell_id,)).fetchone()
            if row is None:
                raise KeyError(cell_id)
            if self._one("SELECT status FROM slides WHERE slide = ?", row["slide"]) == "signed off":
                raise PermissionError(f"slide {row['slide']} is signed off")
            before = row["corrected_label"] or row["label"]
            after = before if label is None else label
            stamp = now()
            db.execute("UPDATE cells SET corrected_label = ?, accepted = 1, updated = ? WHERE id = ?",
                       (after, stamp, cell_id))
            if after != before:
                db.execute("INSERT INTO audit (cell, slide, from_label, to_label, time) VALUES (?,?,?,?,?)",
                           (cell_id, row["slide"], before, after, stamp))
            db.execute("UPDATE slides SET status = 'in review' WHERE slide = ? AND status = 'new'", (row["slide"],))
        return self.cell(cell_id)

    def sign_off(self, slide: str, reviewer: str) -> dict:
        """Mark the slide signed off and write ``OUT/reviewed/<slide>.json`` (atomically)."""
        from ..report import atomic_write_text

        if not self.slide(slide):
            raise KeyError(slide)
        stamp = now()
        with self.transaction() as db:
            db.execute("UPDATE slides SET status = 'signed off', reviewer = ?, signed_at = ? WHERE slide = ?",
                       (reviewer, stamp, slide))
        report = {"slide": slide, "reviewer": reviewer, "signed_at": stamp, **self.summary(slide),
                  "audit": [{**a, "reviewer": reviewer} for a in self.audit(slide)]}
        out = self.out / "reviewed" / f"{safe_name(slide)}.json"
        out.parent.mkdir(exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2))
        return {"written": str(out.relative_to(self.out)), **report}

    # ------------------------------------------------------------ corrected slide

    def corrected_results(self, slide: str) -> Iterator[tuple[dict, ImageResult]]:
        """The slide's fields (their rows) and their records with the corrected calls (corrected cells count as
        placed)."""
        db = self._db()
        known = {f.name for f in dataclass_fields(Cell)}
        for f in db.execute("SELECT * FROM fields WHERE slide = ? ORDER BY field", (slide,)).fetchall():
            cells = []
            for c in db.execute("SELECT record, corrected_label FROM cells WHERE field = ? ORDER BY id",
                                (f["field"],)):
                d = {k: v for k, v in json.loads(c["record"]).items() if k in known}
                if c["corrected_label"]:
                    label = c["corrected_label"]
                    d["label"] = label
                    d["group"] = group_of(label) if group_of(label) in GROUPS else d["group"]
                    d["classifier"] = {**d.get("classifier", {}), "score_in_group": 1.0}  # a person placed it
                cells.append(Cell(**d))
            yield dict(f), ImageResult(image=f["image"], width=f["width"], height=f["height"], cells=cells,
                                       slide=slide, rbc_coverage=f["rbc_coverage"], error=f["error"])

    def settings(self):
        """The analysis run's pipeline settings (``run.json``), else the defaults."""
        from smear.configs.loader import build_known_config

        from ..config import PipelineConfig

        run = self.out / "run.json"
        values = json.loads(run.read_text()).get("config", {}) if run.is_file() else {}
        try:
            return build_known_config(PipelineConfig, values, source=str(run))
        except SmearError:
            return PipelineConfig()

    def summary(self, slide: str) -> dict:
        """Counts, ratios, differential and flags of the slide from its corrected calls."""
        from ..analyze import SlideTotals, slide_from_totals

        cfg = self.settings()
        totals = SlideTotals(slide, cfg.low_confidence_wbc)
        for _, result in self.corrected_results(slide):
            totals.add(result)
        s = slide_from_totals(totals, cfg).to_dict()
        return {k: s[k] for k in ("n_fields", "counts", "ratios", "differential", "flags", "rbc_coverage")
                if k in s}


def safe_name(slide: str) -> str:
    """A slide name as a file name (no path separators, no leading dots)."""
    name = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in slide).strip(". ") or "slide"
    return name
