"""Flags: warning signs worth a closer look, per ../shared/docs/clinical-indicators.md.

Every flag names its rule, threshold, observed value, evidence and caveat. Rules that need a
capture mode or a calibration say so and are skipped without it. Too few cells give an
``insufficient evidence`` flag instead of a guess. None of this is a diagnosis.
"""

from __future__ import annotations

from typing import Any, Iterable

from smear.data.taxonomy import MORPHOLOGY_CLASSES, NRBC, SUBTYPES

from .config import PipelineConfig
from .quality import MIN_RBC_COVERAGE
from .results import Flag, count_noun, wilson_interval

# Normal ranges implied by RBC 4.2-6.1 M/uL, WBC 4-11 k/uL, platelets 150-450 k/uL.
PLATELETS_PER_1000_RBC = (25.0, 107.0)
WBC_PER_1000_RBC = (0.7, 2.6)
# Differential percent ranges (adults).
DIFFERENTIAL_PERCENT = {"Neutrophil": (40.0, 70.0), "Lymphocyte": (20.0, 40.0), "Monocyte": (2.0, 8.0),
                        "Eosinophil": (1.0, 4.0), "Basophil": (0.5, 1.0)}
ABSOLUTE_LIMITS = {"Neutrophil": ("neutrophilia", 7700.0), "Lymphocyte": ("lymphocytosis", 4000.0),
                   "Eosinophil": ("eosinophilia", 500.0), "Basophil": ("basophilia", 200.0)}
HIGH_NAMES = {"Neutrophil": "neutrophil_percent_high", "Lymphocyte": "lymphocytosis_percent",
              "Monocyte": "monocyte_percent_high", "Eosinophil": "eosinophil_percent_high",
              "Basophil": "basophil_percent_high"}
# Immature granulocytes are normally absent or below about 1% of WBCs; "a few percent or more" is a left shift.
IG_PERCENT_HIGH = 2.0
IG = "ImmatureGranulocyte"
DECISION_SUPPORT = "Decision support only, not a diagnosis; confirm by manual review and a full blood count."


def _evidence(counts: dict[str, int], n_fields: int, **extra: Any) -> dict[str, Any]:
    ev = {"fields": n_fields, "rbc": counts.get("RBC", 0), "wbc": counts.get("WBC", 0),
          "platelets": counts.get("Platelets", 0)}
    ev.update(extra)
    return ev


def incomplete_rbc_flag(name: str, rule: str, rbc_coverage: float | None, counts: dict[str, int],
                        n_fields: int, capture_mode: str = "any") -> list[Flag]:
    """One 'insufficient evidence' flag when the RBCs were found too incompletely for a flag that rests on them."""
    if rbc_coverage is None or rbc_coverage >= MIN_RBC_COVERAGE:
        return []
    return [Flag(name, "insufficient evidence", rule, f"RBC boxes cover >= {MIN_RBC_COVERAGE:.0%} of red-cell pixels",
                 f"{rbc_coverage:.0%} covered", _evidence(counts, n_fields, rbc_coverage=rbc_coverage),
                 "Many red cells were not found (touching or clumped cells, or fields unlike the detector's training "
                 "fields), so the RBC count under this ratio is too low and the ratio would mislead. "
                 + DECISION_SUPPORT, capture_mode)]


def platelet_flags(counts: dict[str, int], n_fields: int, cfg: PipelineConfig,
                   rbc_coverage: float | None = None) -> list[Flag]:
    flags = []
    rbc, plt = counts.get("RBC", 0), counts.get("Platelets", 0)
    if cfg.platelet_factor_per_field > 0:
        rule = "platelet estimate = mean platelets per field x calibration factor"
        if n_fields < cfg.min_fields_for_estimate:
            return [Flag("platelet_estimate", "insufficient evidence", rule, f">= {cfg.min_fields_for_estimate} fields",
                         count_noun(n_fields, "field"), _evidence(counts, n_fields),
                         "Too few fields for a platelet estimate. " + DECISION_SUPPORT)]
        est = plt / n_fields * cfg.platelet_factor_per_field
        for name, sev, lim, below in (("thrombocytopenia_spontaneous_bleeding_risk", "critical", 10_000, True),
                                      ("thrombocytopenia_bleeding_risk", "critical", 50_000, True),
                                      ("thrombocytopenia", "warning", 150_000, True),
                                      ("thrombocytosis", "warning", 450_000, False)):
            if (est < lim) if below else (est > lim):
                flags.append(Flag(name, sev, rule, f"{'<' if below else '>'} {lim:,.0f}/uL", f"{est:,.0f}/uL",
                                  _evidence(counts, n_fields, factor=cfg.platelet_factor_per_field),
                                  "Smear estimate from a user-set calibration; platelet clumps or satellitism lower "
                                  "it falsely. " + DECISION_SUPPORT))
                break
        return flags
    rule = "platelets per 1,000 RBC vs 25-107 (implied by 150-450 k/uL platelets and 4.2-6.1 M/uL RBC)"
    if rbc < cfg.min_rbc_for_ratio:
        return [Flag("platelet_ratio", "insufficient evidence", rule, f">= {cfg.min_rbc_for_ratio} RBC needed",
                     f"{rbc} RBC, {plt} platelets", _evidence(counts, n_fields),
                     "Too few RBCs to judge the platelet:RBC ratio; analyse more fields of the slide.")]
    if incomplete := incomplete_rbc_flag("platelet_ratio", rule, rbc_coverage, counts, n_fields):
        return incomplete
    ratio = 1000 * plt / rbc
    lo, hi = PLATELETS_PER_1000_RBC
    if ratio < lo or ratio > hi:
        flags.append(Flag("thrombocytopenia_pattern" if ratio < lo else "thrombocytosis_pattern", "warning", rule,
                          f"{'< ' + str(lo) if ratio < lo else '> ' + str(hi)} per 1,000 RBC",
                          f"{ratio:.1f} per 1,000 RBC", _evidence(counts, n_fields),
                          "Ratio from detected cells without a calibration; missed RBCs or platelets, clumps and "
                          "thick or thin smear areas shift it. " + DECISION_SUPPORT))
    return flags


def wbc_count_flags(counts: dict[str, int], n_fields: int, cfg: PipelineConfig,
                    rbc_coverage: float | None = None) -> list[Flag]:
    if cfg.capture_mode != "random":
        return []  # WBC-centred fields always over-represent WBCs: no count flag means anything there.
    wbc, rbc = counts.get("WBC", 0), counts.get("RBC", 0)
    caveat = "Needs randomly chosen fields; " + DECISION_SUPPORT
    if cfg.wbc_factor_per_field > 0:
        rule = "WBC estimate = mean WBC per field x calibration factor"
        if n_fields < cfg.min_fields_for_estimate:
            return [Flag("wbc_estimate", "insufficient evidence", rule, f">= {cfg.min_fields_for_estimate} fields",
                         count_noun(n_fields, "field"), _evidence(counts, n_fields), caveat, "random")]
        est = wbc / n_fields * cfg.wbc_factor_per_field
        if est > 11_000 or est < 4_000:
            return [Flag("leukocytosis" if est > 11_000 else "leukopenia", "warning", rule,
                         "> 11,000/uL" if est > 11_000 else "< 4,000/uL", f"{est:,.0f}/uL",
                         _evidence(counts, n_fields, factor=cfg.wbc_factor_per_field),
                         "Smear estimates are within about 20-30%. " + caveat, "random")]
        return []
    rule = "WBC per 1,000 RBC vs 0.7-2.6 (implied by 4-11 k/uL WBC and 4.2-6.1 M/uL RBC)"
    if rbc < cfg.min_rbc_for_ratio:
        return [Flag("wbc_ratio", "insufficient evidence", rule, f">= {cfg.min_rbc_for_ratio} RBC needed",
                     f"{rbc} RBC, {wbc} WBC", _evidence(counts, n_fields), caveat, "random")]
    if incomplete := incomplete_rbc_flag("wbc_ratio", rule, rbc_coverage, counts, n_fields, "random"):
        return incomplete
    ratio = 1000 * wbc / rbc
    lo, hi = WBC_PER_1000_RBC
    if ratio > hi or ratio < lo:
        return [Flag("leukocytosis_pattern" if ratio > hi else "leukopenia_pattern", "warning", rule,
                     f"> {hi} per 1,000 RBC" if ratio > hi else f"< {lo} per 1,000 RBC", f"{ratio:.2f} per 1,000 RBC",
                     _evidence(counts, n_fields), caveat, "random")]
    return []


def differential_flags(counts: dict[str, int], differential: dict[str, Any], n_fields: int, cfg: PipelineConfig,
                       wbc_estimate: float | None = None) -> list[Flag]:
    n = differential.get("n_wbc", 0)
    if n == 0:
        return []
    flags = []
    rule = "WBC differential percent vs adult reference ranges"
    if n < cfg.min_wbc_for_differential:
        observed = {s: f"{differential[s]['count']} ({differential[s]['percent']}%, 95% CI "
                       f"{differential[s]['ci95'][0]}-{differential[s]['ci95'][1]}%)" for s in SUBTYPES}
        return [Flag("differential", "insufficient evidence", rule, f">= {cfg.min_wbc_for_differential} WBCs",
                     observed, _evidence(counts, n_fields, classified_wbc=n),
                     f"Only {count_noun(n, 'WBC')}: the evidence is thin; counts are shown with 95% confidence intervals. "
                     "A differential rests on at least 100 WBCs.")]
    for s in DIFFERENTIAL_PERCENT:
        pct = differential[s]["percent"]
        lo, hi = DIFFERENTIAL_PERCENT[s]
        if pct is not None and pct > hi:
            flags.append(Flag(HIGH_NAMES[s], "warning", rule, f"> {hi}%", f"{pct}% (95% CI {differential[s]['ci95'][0]}-"
                              f"{differential[s]['ci95'][1]}%)", _evidence(counts, n_fields, classified_wbc=n),
                              "Percentages only: absolute counts matter more (needs a WBC count). " + DECISION_SUPPORT))
    if wbc_estimate is not None:
        for s, (name, lim) in ABSOLUTE_LIMITS.items():
            absolute = wbc_estimate * (differential[s]["percent"] or 0) / 100
            if absolute > lim:
                sev = "warning"
                extra = ""
                if s == "Eosinophil":
                    extra = " (mild)" if absolute <= 1500 else " (moderate)" if absolute <= 5000 else " (severe)"
                flags.append(Flag(name, sev, f"absolute {s.lower()} count = WBC estimate x percent", f"> {lim:,.0f}/uL",
                                  f"{absolute:,.0f}/uL{extra}", _evidence(counts, n_fields, classified_wbc=n),
                                  "From a calibrated smear estimate. " + DECISION_SUPPORT, "random"))
    return flags


def left_shift_flags(differential: dict[str, Any], counts: dict[str, int], n_fields: int,
                     cfg: PipelineConfig) -> list[Flag]:
    """Immature granulocytes (promyelocytes, myelocytes, metamyelocytes) above a few percent of the differential."""
    n, ig = differential.get("n_wbc", 0), (differential.get(IG) or {}).get("count", 0)
    if not ig:
        return []
    lo, hi = differential[IG]["ci95"]
    rule = "immature granulocytes as a percent of the WBC differential (normally absent or below about 1%)"
    observed = f"{count_noun(ig, 'immature granulocyte')} of {count_noun(n, 'WBC')} ({differential[IG]['percent']}%, " \
               f"95% CI {lo}-{hi}%)"
    caveat = ("A left shift is worth review (infection or inflammation, G-CSF, pregnancy, a myeloproliferative "
              "process); look at the cells, since a band or a reactive cell can be named an immature granulocyte. "
              + DECISION_SUPPORT)
    ev = _evidence(counts, n_fields, classified_wbc=n, immature_granulocytes=ig)
    if n < cfg.min_wbc_for_differential:
        return [Flag("left_shift_pattern", "insufficient evidence", rule, f"> {IG_PERCENT_HIGH:g}% of >= "
                     f"{cfg.min_wbc_for_differential} WBCs", observed, ev,
                     f"Only {count_noun(n, 'WBC')}: too few for a percent; the immature granulocytes found are "
                     "listed for review. " + caveat)]
    if differential[IG]["percent"] > IG_PERCENT_HIGH:
        return [Flag("left_shift_pattern", "warning", rule, f"> {IG_PERCENT_HIGH:g}%", observed, ev, caveat)]
    return []


def nrbc_flags(differential: dict[str, Any], counts: dict[str, int], n_fields: int) -> list[Flag]:
    """Any nucleated RBC: normally none in adult blood (newborns have some)."""
    nrbc = differential.get("nrbc_per_100_wbc") or {}
    k = nrbc.get("count", 0)
    if not k:
        return []
    n = differential.get("n_wbc", 0)
    per100 = nrbc.get("per_100_wbc")
    observed = count_noun(k, "nucleated RBC") + (f" ({per100} per 100 WBCs, {n} WBCs)" if per100 is not None
                                                 else " (no WBC classified)")
    thin = "One or two cells are thin evidence and may be misnamed lymphocytes or debris; look at them. " if k < 3 else ""
    return [Flag("nrbc_present", "warning", "nucleated RBCs (erythroblasts) per 100 WBCs, outside the differential",
                 "> 0 in an adult", observed, _evidence(counts, n_fields, nrbc=k, classified_wbc=n),
                 thin + "NRBCs in an adult are worth review (marrow stress such as haemolysis, hypoxia or severe "
                 "anaemia; marrow infiltration; asplenia); normal in newborns. They are not counted as WBCs here. "
                 + DECISION_SUPPORT)]


def unplaced_wbc_flag(n_unplaced: int, n_wbc: int, counts: dict[str, int], n_fields: int) -> list[Flag]:
    """WBCs the classifier cannot place with confidence: the only indirect blast sign BCCD allows."""
    if n_wbc == 0 or n_unplaced == 0:
        return []
    frac = n_unplaced / n_wbc
    if n_unplaced >= 3 and frac >= 0.10 or n_unplaced >= 1 and n_wbc < 3 and frac >= 0.5:
        return [Flag("unplaced_wbc", "warning", "WBCs whose best subtype probability is low",
                     ">= 10% of WBCs (and >= 3) or most of a few", f"{n_unplaced} of {count_noun(n_wbc, 'WBC')}",
                     _evidence(counts, n_fields, unplaced_wbc=n_unplaced),
                     "The model was trained without blasts or abnormal WBCs (BCCD has none), so it cannot name them; "
                     "unplaced WBCs are only an indirect sign worth a look. Not a leukemia finding.")]
    return []


def rbc_size_flags(mean_diameter_um: float | None, n_rbc: int, counts: dict[str, int], n_fields: int,
                   rbc_coverage: float | None = None) -> list[Flag]:
    if mean_diameter_um is None or n_rbc < 30:
        return []
    rule = "mean RBC diameter (box side x pixel size) vs 6-9 um"
    if incomplete := incomplete_rbc_flag("rbc_size", rule, rbc_coverage, counts, n_fields):
        return incomplete
    if mean_diameter_um < 6.0 or mean_diameter_um > 9.0:
        return [Flag("microcytosis_pattern" if mean_diameter_um < 6 else "macrocytosis_pattern", "warning", rule,
                     "< 6 um" if mean_diameter_um < 6 else "> 9 um", f"{mean_diameter_um:.2f} um",
                     _evidence(counts, n_fields), "Size from detection boxes and a user-set pixel size; anemia is "
                     "defined by haemoglobin, which no image measures. " + DECISION_SUPPORT)]
    return []


def compute_flags(counts: dict[str, int], differential: dict[str, Any], n_fields: int, cfg: PipelineConfig,
                  n_unplaced_wbc: int = 0, mean_rbc_diameter_um: float | None = None,
                  rbc_coverage: float | None = None) -> list[Flag]:
    """All flags for a set of fields (one image or a whole slide).

    ``rbc_coverage`` (see :mod:`smear.pipeline.quality`) below ``MIN_RBC_COVERAGE`` turns the flags that rest
    on the RBC count (platelet:RBC, WBC:RBC, RBC size) into 'insufficient evidence' with the figure.
    """
    wbc_estimate = None
    if cfg.capture_mode == "random" and cfg.wbc_factor_per_field > 0 and n_fields >= cfg.min_fields_for_estimate:
        wbc_estimate = counts.get("WBC", 0) / n_fields * cfg.wbc_factor_per_field
    return (platelet_flags(counts, n_fields, cfg, rbc_coverage) + wbc_count_flags(counts, n_fields, cfg, rbc_coverage)
            + differential_flags(counts, differential, n_fields, cfg, wbc_estimate)
            + left_shift_flags(differential, counts, n_fields, cfg) + nrbc_flags(differential, counts, n_fields)
            + unplaced_wbc_flag(n_unplaced_wbc, counts.get("WBC", 0), counts, n_fields)
            + rbc_size_flags(mean_rbc_diameter_um, counts.get("RBC", 0), counts, n_fields, rbc_coverage))


# ---------------------------------------------------------------- RBC morphology

MIN_RBC_FOR_MORPHOLOGY = 100


# (flag name, labels pooled, threshold % of RBCs with a call, what the pattern points to).
# Schistocytes: ICSH 2021 (> 1% suspicious for thrombotic microangiopathy). Spherocytes and
# teardrops: clinically weighty at low shares, graded from about 5%. Target cells, elliptocytes/
# ovalocytes, microcytes/hypochromia and macrocytes occur at low shares in normal films and are
# graded moderate from about 11% (ICSH 2015), so > 10%.
MORPHOLOGY_RULES: tuple[tuple[str, tuple[str, ...], float, str], ...] = (
    ("schistocytes", ("schistocyte",), 1.0,
     "fragments point to microangiopathic haemolysis (TTP, HUS, DIC) or mechanical damage"),
    ("spherocytes", ("spherocyte",), 5.0, "point to hereditary spherocytosis or immune haemolysis"),
    ("teardrop_cells", ("teardrop",), 5.0, "point to marrow fibrosis or infiltration, or thalassaemia"),
    ("microcytic_hypochromic_pattern", ("microcyte", "hypochromia"), 10.0,
     "points to iron deficiency or thalassaemia trait (check ferritin, Hb electrophoresis)"),
    ("target_cells", ("target_cell",), 10.0, "point to haemoglobinopathy/thalassaemia, liver disease, hyposplenism"),
    ("elliptocytes_ovalocytes", ("elliptocyte", "ovalocyte"), 10.0,
     "point to hereditary elliptocytosis, iron deficiency, thalassaemia or myelofibrosis"),
    ("macrocytes", ("macrocyte",), 10.0, "point to B12/folate deficiency, liver disease, alcohol or reticulocytosis"),
)


MORPHOLOGY_CAVEAT = ("Morphology hints from a model trained on one laboratory's images (Chula RBC-12); not anemia, "
                     "which is defined by haemoglobin, and not a diagnosis. Confirm on the slide and with a full "
                     "blood count.")


def summarize_morphology(cells: Iterable[Any]) -> dict:
    """``{"n_rbc", "counts", "percent"}`` over the cells that carry a morphology call.

    Example:
        >>> summarize_morphology(result.cells)["percent"]["schistocyte"]
    """
    from collections import Counter

    return summarize_morphology_counts(Counter(c.morphology["label"] for c in cells if getattr(c, "morphology", None)))


def summarize_morphology_counts(label_counts: dict[str, int]) -> dict:
    """The same summary from calls counted per label (e.g. running totals over a slide's fields)."""
    n = sum(label_counts.values())
    names = list(MORPHOLOGY_CLASSES) + sorted(lab for lab in label_counts if lab not in MORPHOLOGY_CLASSES)
    counts = {k: int(label_counts.get(k, 0)) for k in names}
    return {"n_rbc": n, "counts": counts,
            "percent": {k: (round(100 * v / n, 2) if n else None) for k, v in counts.items()}}


def morphology_flags(summary: dict | None, counts: dict[str, int], n_fields: int) -> list:
    """Morphology flags (see ``MORPHOLOGY_RULES``), or one 'insufficient evidence' flag below 100 RBCs."""
    if not summary:
        return []
    n = int(summary.get("n_rbc", 0))
    evidence = {"fields": n_fields, "rbc": counts.get("RBC", n), "rbc_with_morphology": n}
    if n < MIN_RBC_FOR_MORPHOLOGY:
        return [Flag("rbc_morphology", "insufficient evidence", "share of RBCs per morphology class",
                     f">= {MIN_RBC_FOR_MORPHOLOGY} RBCs with a morphology call", count_noun(n, "RBC"), evidence,
                     f"Only {count_noun(n, 'RBC')} carry a morphology call; analyse more fields before reading shares. "
                     + MORPHOLOGY_CAVEAT)]
    flags = []
    for name, labels, threshold, meaning in MORPHOLOGY_RULES:
        k = sum(int(summary["counts"].get(lab, 0)) for lab in labels)
        pct = 100 * k / n
        if pct > threshold:
            lo, hi = wilson_interval(k, n)
            flags.append(Flag(name, "warning", f"share of RBCs called {' or '.join(labels)}", f"> {threshold:g}%",
                              f"{pct:.1f}% ({k} of {n} RBCs, 95% CI {lo}-{hi}%)",
                              {**evidence, "cells": k, "labels": list(labels)},
                              f"{meaning[0].upper()}{meaning[1:]}. " + MORPHOLOGY_CAVEAT))
    return flags
