"""Typed results: ``Cell``, ``Flag``, ``ImageResult``, ``SlideResult``; JSON, CSV and HTML are views of these."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from smear.data.taxonomy import GROUPS, NRBC, SUBTYPES


@dataclass
class Cell:
    """One detected cell. ``box`` is xyxy in original pixels."""

    box: list[float]
    group: str
    label: str
    score: float
    detector: dict[str, Any]
    classifier: dict[str, Any]
    review: bool = False
    morphology: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["morphology"] is None:
            d.pop("morphology")
        return d


@dataclass
class Flag:
    """A warning sign with its reasoning. Never a diagnosis.

    ``severity`` is ``critical``, ``warning`` or ``insufficient evidence``.
    """

    name: str
    severity: str
    rule: str
    threshold: Any
    observed: Any
    evidence: dict[str, Any]
    caveat: str
    capture_mode: str = "any"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=4096)  # binomtest costs a few ms a call; flags ask for the same k, n again and again
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n, in percent, rounded to 0.1 (scipy's ``binomtest``).

    ``z`` is the normal quantile of the two-sided level (1.96 for 95%). No cells (n = 0) say nothing: (0, 100).

    Example:
        >>> wilson_interval(6, 10)
        (31.3, 83.2)
    """
    if n == 0:
        return (0.0, 100.0)
    from scipy.stats import binomtest, norm  # scipy.stats takes a while to import: only when asked

    ci = binomtest(k, n).proportion_ci(confidence_level=2 * float(norm.cdf(z)) - 1, method="wilson")
    return (round(100 * max(0.0, float(ci.low)), 1), round(100 * min(1.0, float(ci.high)), 1))


def count_noun(n: int, noun: str) -> str:
    """``1 WBC``, ``2 WBCs``, ``0 fields``: a count with its noun in the right number."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def count_cells(cells: list[Cell]) -> dict[str, int]:
    """Counts per final label plus the three groups (RBC, WBC, Platelets).

    Nucleated RBCs (``Erythroblast``) are counted apart and not as WBCs, whatever group found them: an
    analyser's WBC count is corrected for them the same way."""
    counts = {c: 0 for c in ("RBC", "Platelets", *SUBTYPES, NRBC, "WBC")}
    for c in cells:
        if c.label in counts and c.label != "WBC":
            counts[c.label] += 1
        if c.group == "WBC" and c.label != NRBC:
            counts["WBC"] += 1
    return counts


def ratios_from_counts(counts: dict[str, int]) -> dict[str, float | None]:
    rbc = counts.get("RBC", 0)
    return {
        "platelets_per_1000_rbc": round(1000 * counts.get("Platelets", 0) / rbc, 1) if rbc else None,
        "wbc_per_1000_rbc": round(1000 * counts.get("WBC", 0) / rbc, 1) if rbc else None,
    }


def differential_from_counts(counts: dict[str, int]) -> dict[str, Any]:
    """WBC differential over subtype-classified WBCs: count, percent and 95% CI per subtype (immature granulocytes
    included, as differentials count them), plus nucleated RBCs per 100 of those WBCs, outside the differential."""
    n = sum(counts.get(s, 0) for s in SUBTYPES)
    out: dict[str, Any] = {"n_wbc": n}
    for s in SUBTYPES:
        k = counts.get(s, 0)
        out[s] = {"count": k, "percent": round(100 * k / n, 1) if n else None, "ci95": list(wilson_interval(k, n))}
    k = counts.get(NRBC, 0)
    out["nrbc_per_100_wbc"] = {"count": k, "per_100_wbc": round(100 * k / n, 1) if n else None}
    return out


@dataclass
class ImageResult:
    """Everything smear says about one field; ``error`` set (and no cells) when it could not be read."""

    image: str
    width: int | None = None
    height: int | None = None
    cells: list[Cell] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    differential: dict[str, Any] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    error: str | None = None
    slide: str | None = None
    morphology: dict[str, Any] | None = None
    scale: float | None = None  # resize factor the detector ran at (scale=auto: chosen from the RBC size)
    rbc_diameter_px: float | None = None  # median RBC box side that scale=auto measured, in this image's pixels
    rbc_coverage: float | None = None  # share of red-cell pixels inside RBC boxes (smear.pipeline.quality)
    stain_mapped_to: str | None = None  # colours unlike every training lab's: mapped onto this lab's for detection
    warnings: list[str] = field(default_factory=list)
    sha256: str | None = None  # of the file's bytes: 'smear analyze --resume' keeps a record only for the same file

    def to_dict(self) -> dict[str, Any]:
        d = {
            "image": self.image, "sha256": self.sha256, "width": self.width, "height": self.height,
            "cells": [c.to_dict() for c in self.cells], "counts": self.counts, "ratios": self.ratios,
            "differential": self.differential, "flags": [f.to_dict() for f in self.flags], "error": self.error,
            "slide": self.slide, "scale": self.scale, "rbc_diameter_px": self.rbc_diameter_px,
            "rbc_coverage": self.rbc_coverage, "stain_mapped_to": self.stain_mapped_to,
            "warnings": list(self.warnings),
        }
        if self.morphology is not None:
            d["morphology"] = self.morphology
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageResult":
        """The record ``to_dict`` wrote (a line of results.jsonl), back: ``from_dict(r.to_dict()).to_dict()`` is
        ``r.to_dict()``."""
        d = dict(d)
        d["cells"] = [Cell(**c) for c in d.get("cells") or []]
        d["flags"] = [Flag(**f) for f in d.get("flags") or []]
        return cls(**d)

    def summary_row(self) -> dict[str, Any]:
        """One flat row for summary.csv."""
        row: dict[str, Any] = {"image": self.image, "slide": self.slide or "", "width": self.width,
                               "height": self.height, "error": self.error or ""}
        for c in ("RBC", "WBC", "Platelets", *SUBTYPES, NRBC):
            row[f"n_{c}"] = self.counts.get(c, 0) if not self.error else ""
        # Every row has the ratio columns, so the header (taken from the first row) fits a batch
        # whose first file failed.
        for k, v in {**dict.fromkeys(ratios_from_counts({})), **self.ratios}.items():
            row[k] = v if v is not None else ""
        row["n_review"] = sum(c.review for c in self.cells)
        row["scale"] = "" if self.scale is None else self.scale
        row["rbc_coverage"] = "" if self.rbc_coverage is None else self.rbc_coverage
        row["stain_mapped_to"] = self.stain_mapped_to or ""
        row["warnings"] = "; ".join(self.warnings)
        row["flags"] = "; ".join(f"{f.name} ({f.severity})" for f in self.flags)
        return row


@dataclass
class SlideResult:
    """All fields of one slide, aggregated."""

    slide: str
    images: list[ImageResult]
    counts: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    differential: dict[str, Any] = field(default_factory=dict)
    estimates: dict[str, Any] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    capture_mode: str = "wbc-centred"
    morphology: dict[str, Any] | None = None
    rbc_coverage: float | None = None  # mean over its fields of the share of red-cell pixels inside RBC boxes

    @property
    def n_fields(self) -> int:
        return sum(1 for r in self.images if not r.error)

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.images if r.error)

    def to_dict(self) -> dict[str, Any]:
        d = {"slide": self.slide, "n_fields": self.n_fields, "n_failed": self.n_failed,
             "capture_mode": self.capture_mode, "rbc_coverage": self.rbc_coverage, "counts": self.counts,
             "ratios": self.ratios,
             "differential": self.differential, "estimates": self.estimates,
             "flags": [f.to_dict() for f in self.flags], "images": [r.image for r in self.images]}
        if self.morphology is not None:
            d["morphology"] = self.morphology
        return d


@dataclass
class BatchResult:
    """What ``Analyzer.analyze_batch`` keeps of a batch: its slides and the fields that failed, no cells."""

    slides: list[SlideResult]
    n_images: int
    failed: list[ImageResult] = field(default_factory=list)


__all__ = ["Cell", "Flag", "ImageResult", "SlideResult", "BatchResult", "GROUPS", "count_cells",
           "ratios_from_counts", "differential_from_counts", "wilson_interval"]
