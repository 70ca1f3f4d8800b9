"""Flags follow ../shared/docs/clinical-indicators.md; each flag carries its full reasoning."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cells_with_morphology, draw_field, make_cell

from smear.configs.loader import build_config
from smear.data.taxonomy import MORPHOLOGY_CLASSES, SUBTYPES
from smear.pipeline.config import PipelineConfig
from smear.pipeline.flags import (
    MIN_RBC_FOR_MORPHOLOGY,
    compute_flags,
    differential_flags,
    left_shift_flags,
    morphology_flags,
    nrbc_flags,
    platelet_flags,
    rbc_size_flags,
    summarize_morphology,
    unplaced_wbc_flag,
    wbc_count_flags,
)
from smear.pipeline.results import (
    Cell,
    Flag,
    count_cells,
    differential_from_counts,
    ratios_from_counts,
    wilson_interval,
)

SEVERITIES = {"critical", "warning", "insufficient evidence"}


def counts(rbc: int = 0, plt: int = 0, wbc: int | None = None, **subtypes: int) -> dict[str, int]:
    c = {"RBC": rbc, "Platelets": plt, **{s: subtypes.get(s, 0) for s in SUBTYPES}}
    c["WBC"] = sum(subtypes.values()) if wbc is None else wbc
    return c


def cfg(**kw) -> PipelineConfig:
    return build_config(PipelineConfig, kw)


def flags_for(c: dict[str, int], n_fields: int = 1, **kw) -> list[Flag]:
    return compute_flags(c, differential_from_counts(c), n_fields, cfg(**kw))


def names(flags: list[Flag]) -> list[str]:
    return [f.name for f in flags]


def assert_complete(f: Flag) -> None:
    d = f.to_dict()
    for key in ("name", "severity", "rule", "threshold", "observed", "evidence", "caveat"):
        assert key in d
    assert f.name and f.rule and f.caveat
    assert f.severity in SEVERITIES
    assert f.threshold not in (None, "") and f.observed not in (None, "")
    assert isinstance(f.evidence, dict) and "fields" in f.evidence and "rbc" in f.evidence
    assert f.capture_mode in ("any", "random", "wbc-centred")


# ---------------------------------------------------------------- platelets

def test_low_platelet_ratio_gives_thrombocytopenia_pattern():
    fl = platelet_flags(counts(rbc=1000, plt=20), 4, cfg())
    assert names(fl) == ["thrombocytopenia_pattern"]
    f = fl[0]
    assert f.severity == "warning" and "25" in f.threshold and f.observed == "20.0 per 1,000 RBC"
    assert f.evidence["rbc"] == 1000 and f.evidence["platelets"] == 20 and f.evidence["fields"] == 4
    assert "not a diagnosis" in f.caveat


@pytest.mark.parametrize("plt,expected", [(24, ["thrombocytopenia_pattern"]), (25, []), (60, []), (107, []),
                                          (108, ["thrombocytosis_pattern"])])
def test_platelet_ratio_band(plt, expected):
    assert names(platelet_flags(counts(rbc=1000, plt=plt), 3, cfg())) == expected


def test_too_few_rbc_is_insufficient_evidence():
    fl = platelet_flags(counts(rbc=299, plt=0), 1, cfg())
    assert names(fl) == ["platelet_ratio"] and fl[0].severity == "insufficient evidence"
    assert "300" in fl[0].threshold and "299 RBC" in fl[0].observed
    assert names(platelet_flags(counts(rbc=50, plt=0), 1, cfg(min_rbc_for_ratio=40))) == ["thrombocytopenia_pattern"]


@pytest.mark.parametrize("plt,name,severity", [
    (5, "thrombocytopenia_spontaneous_bleeding_risk", "critical"),   # 7,500/uL
    (30, "thrombocytopenia_bleeding_risk", "critical"),              # 45,000/uL
    (90, "thrombocytopenia", "warning"),                             # 135,000/uL
    (200, None, None),                                               # 300,000/uL
    (310, "thrombocytosis", "warning"),                              # 465,000/uL
])
def test_calibrated_platelet_estimate(plt, name, severity):
    fl = platelet_flags(counts(rbc=3000, plt=plt), 10, cfg(platelet_factor_per_field=15000))
    if name is None:
        assert fl == []
        return
    assert names(fl) == [name] and fl[0].severity == severity
    assert fl[0].evidence["factor"] == 15000 and fl[0].observed.endswith("/uL")
    assert_complete(fl[0])


def test_calibrated_estimate_needs_enough_fields():
    fl = platelet_flags(counts(rbc=3000, plt=0), 9, cfg(platelet_factor_per_field=15000))
    assert names(fl) == ["platelet_estimate"] and fl[0].severity == "insufficient evidence"
    assert "10 fields" in fl[0].threshold and fl[0].observed == "9 fields"


def test_calibration_replaces_the_ratio_rule():
    # 150k/uL exactly: no flag, even though the ratio alone (10 per 1,000 RBC) would be low
    assert platelet_flags(counts(rbc=1000, plt=10), 10, cfg(platelet_factor_per_field=150_000)) == []


# ---------------------------------------------------------------- WBC count

def test_wbc_count_flags_only_in_random_capture_mode():
    c = counts(rbc=2000, plt=100, wbc=20)                 # 10 WBC per 1,000 RBC: far above 2.6
    assert wbc_count_flags(c, 10, cfg()) == []            # wbc-centred (the default): never judged
    assert "leukocytosis_pattern" not in names(flags_for(c, 10))
    fl = wbc_count_flags(c, 10, cfg(capture_mode="random"))
    assert names(fl) == ["leukocytosis_pattern"] and fl[0].capture_mode == "random"
    assert "random" in fl[0].caveat.lower()
    low = wbc_count_flags(counts(rbc=2000, wbc=1), 10, cfg(capture_mode="random"))
    assert names(low) == ["leukopenia_pattern"]
    assert wbc_count_flags(counts(rbc=2000, wbc=3), 10, cfg(capture_mode="random")) == []


def test_wbc_ratio_insufficient_rbc_in_random_mode():
    fl = wbc_count_flags(counts(rbc=100, wbc=5), 1, cfg(capture_mode="random"))
    assert names(fl) == ["wbc_ratio"] and fl[0].severity == "insufficient evidence"


def test_calibrated_wbc_estimate():
    c = counts(rbc=5000, wbc=60)                           # 6 per field x 2,000 = 12,000/uL
    assert wbc_count_flags(c, 10, cfg(wbc_factor_per_field=2000)) == []
    fl = wbc_count_flags(c, 10, cfg(capture_mode="random", wbc_factor_per_field=2000))
    assert names(fl) == ["leukocytosis"] and fl[0].observed == "12,000/uL" and fl[0].threshold == "> 11,000/uL"
    fl = wbc_count_flags(counts(rbc=5000, wbc=15), 10, cfg(capture_mode="random", wbc_factor_per_field=2000))
    assert names(fl) == ["leukopenia"]
    assert wbc_count_flags(counts(rbc=5000, wbc=30), 10, cfg(capture_mode="random", wbc_factor_per_field=2000)) == []
    fl = wbc_count_flags(c, 5, cfg(capture_mode="random", wbc_factor_per_field=2000))
    assert names(fl) == ["wbc_estimate"] and fl[0].severity == "insufficient evidence"


# ---------------------------------------------------------------- differential

def test_small_differential_is_insufficient_evidence_with_cis():
    c = counts(rbc=1000, plt=50, Neutrophil=6, Lymphocyte=3, Monocyte=1)
    diff = differential_from_counts(c)
    fl = differential_flags(c, diff, 2, cfg())
    assert names(fl) == ["differential"] and fl[0].severity == "insufficient evidence"
    assert set(fl[0].observed) == set(SUBTYPES)
    assert "95% CI" in fl[0].observed["Neutrophil"] and fl[0].observed["Neutrophil"].startswith("6 (60.0%")
    lo, hi = wilson_interval(6, 10)
    assert f"{lo}-{hi}%" in fl[0].observed["Neutrophil"]
    assert fl[0].evidence["classified_wbc"] == 10 and "100" in fl[0].threshold
    assert "thin" in fl[0].caveat


def test_no_classified_wbc_no_differential_flag():
    c = counts(rbc=1000, plt=50, wbc=2)  # WBCs seen but none placed in a subtype
    assert differential_flags(c, differential_from_counts(c), 1, cfg()) == []


def test_lymphocytosis_percent_with_100_wbcs():
    c = counts(rbc=5000, plt=300, Neutrophil=45, Lymphocyte=50, Monocyte=4, Eosinophil=1)
    fl = differential_flags(c, differential_from_counts(c), 20, cfg())
    assert names(fl) == ["lymphocytosis_percent"]
    f = fl[0]
    assert f.severity == "warning" and f.threshold == "> 40.0%" and f.observed.startswith("50.0% (95% CI")
    assert f.evidence["classified_wbc"] == 100
    assert "absolute" in f.caveat.lower()
    assert_complete(f)


def test_normal_differential_no_flags():
    c = counts(rbc=5000, plt=300, Neutrophil=60, Lymphocyte=30, Monocyte=6, Eosinophil=3, Basophil=1)
    assert differential_flags(c, differential_from_counts(c), 20, cfg()) == []


def test_absolute_counts_need_calibrated_random_fields():
    c = counts(rbc=5000, plt=300, Neutrophil=40, Lymphocyte=40, Monocyte=5, Eosinophil=15)  # 100 WBC in 10 fields
    assert "lymphocytosis" not in names(flags_for(c, 10))
    fl = flags_for(c, 10, capture_mode="random", wbc_factor_per_field=2000)   # 20,000 WBC/uL
    got = {f.name: f for f in fl}
    assert {"leukocytosis", "lymphocytosis", "eosinophilia", "neutrophilia", "eosinophil_percent_high"} <= set(got)
    assert got["lymphocytosis"].observed == "8,000/uL" and got["lymphocytosis"].capture_mode == "random"
    assert got["eosinophilia"].observed == "3,000/uL (moderate)"
    assert got["neutrophilia"].observed == "8,000/uL"


# ---------------------------------------------------------------- other flags

def test_unplaced_wbc_flag():
    c = counts(rbc=1000, wbc=20)
    fl = unplaced_wbc_flag(3, 20, c, 5)
    assert names(fl) == ["unplaced_wbc"] and "not a leukemia finding" in fl[0].caveat.lower()
    assert unplaced_wbc_flag(2, 20, c, 5) == []
    assert names(unplaced_wbc_flag(1, 2, c, 1)) == ["unplaced_wbc"]
    assert unplaced_wbc_flag(0, 0, c, 1) == []


def test_rbc_size_flags_need_calibration_and_cells():
    c = counts(rbc=40)
    assert names(rbc_size_flags(5.2, 40, c, 1)) == ["microcytosis_pattern"]
    assert names(rbc_size_flags(9.6, 40, c, 1)) == ["macrocytosis_pattern"]
    assert rbc_size_flags(7.5, 40, c, 1) == []
    assert rbc_size_flags(5.2, 29, c, 1) == []
    assert rbc_size_flags(None, 400, c, 1) == []


def test_every_flag_is_complete_and_never_a_diagnosis():
    cases = [
        (counts(rbc=1000, plt=10, Neutrophil=2), 1, {}),
        (counts(rbc=100, plt=10, wbc=3), 1, {"capture_mode": "random"}),
        (counts(rbc=3000, plt=5, Lymphocyte=80, Neutrophil=20), 10,
         {"capture_mode": "random", "platelet_factor_per_field": 15000, "wbc_factor_per_field": 3000}),
        (counts(rbc=3000, plt=5, wbc=2), 3, {"platelet_factor_per_field": 15000}),
    ]
    seen = set()
    for c, n, kw in cases:
        for f in compute_flags(c, differential_from_counts(c), n, cfg(**kw), n_unplaced_wbc=1, mean_rbc_diameter_um=5.0):
            assert_complete(f)
            seen.add(f.name)
            text = f"{f.name} {f.rule} {f.caveat}".lower()
            assert "leukemia" not in f.name and "anemia" not in f.name
            assert "diagnosis" not in text or "not a diagnosis" in text or "not a leukemia" in text
    assert len(seen) >= 8


# ---------------------------------------------------------------- counts and intervals

def test_wilson_interval_sanity():
    assert wilson_interval(0, 0) == (0.0, 100.0)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(40.4, abs=0.1) and hi == pytest.approx(59.6, abs=0.1)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] > 20
    assert wilson_interval(10, 10)[1] == 100.0 and wilson_interval(10, 10)[0] < 80
    for k, n in [(1, 3), (7, 20), (30, 100), (999, 1000)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= 100 * k / n <= hi <= 100
    assert wilson_interval(30, 100)[1] - wilson_interval(30, 100)[0] > \
        wilson_interval(300, 1000)[1] - wilson_interval(300, 1000)[0]  # more cells, narrower interval


def test_differential_and_ratios_from_counts():
    c = counts(rbc=2000, plt=80, wbc=5, Neutrophil=3, Lymphocyte=1)
    d = differential_from_counts(c)
    assert d["n_wbc"] == 4 and d["Neutrophil"]["count"] == 3 and d["Neutrophil"]["percent"] == 75.0
    assert d["Basophil"]["percent"] == 0.0 and len(d["Basophil"]["ci95"]) == 2
    assert ratios_from_counts(c) == {"platelets_per_1000_rbc": 40.0, "wbc_per_1000_rbc": 2.5}
    assert ratios_from_counts(counts()) == {"platelets_per_1000_rbc": None, "wbc_per_1000_rbc": None}
    assert differential_from_counts(counts())["Neutrophil"]["percent"] is None


def test_count_cells_groups_and_labels():

    def cell(group, label):
        return Cell([0, 0, 1, 1], group, label, 0.9, {}, {})

    got = count_cells([cell("RBC", "RBC"), cell("WBC", "Neutrophil"), cell("WBC", "Neutrophil"),
                       cell("Platelets", "Platelets")])
    assert got["RBC"] == 1 and got["Neutrophil"] == 2 and got["WBC"] == 2 and got["Platelets"] == 1

def test_nucleated_rbcs_are_counted_apart_from_wbcs():

    def cell(group, label):
        return Cell([0, 0, 1, 1], group, label, 0.9, {}, {})

    got = count_cells([cell("WBC", "Neutrophil"), cell("WBC", "Erythroblast"), cell("WBC", "ImmatureGranulocyte")])
    assert got["WBC"] == 2 and got["Erythroblast"] == 1 and got["ImmatureGranulocyte"] == 1
    d = differential_from_counts(got)
    assert d["n_wbc"] == 2 and d["ImmatureGranulocyte"]["percent"] == 50.0  # inside the differential
    assert d["nrbc_per_100_wbc"] == {"count": 1, "per_100_wbc": 50.0}  # outside it


def test_left_shift_over_a_few_percent_of_enough_wbcs():
    c = counts(rbc=5000, plt=300, Neutrophil=57, Lymphocyte=30, Monocyte=6, Eosinophil=2, ImmatureGranulocyte=5)
    (f,) = left_shift_flags(differential_from_counts(c), c, 20, cfg())
    assert f.name == "left_shift_pattern" and f.severity == "warning" and f.threshold == "> 2%"
    assert f.observed.startswith("5 immature granulocytes of 100 WBCs (5.0%, 95% CI")
    assert f.evidence["immature_granulocytes"] == 5
    assert_complete(f)
    one = counts(rbc=5000, plt=300, Neutrophil=60, Lymphocyte=33, Monocyte=6, ImmatureGranulocyte=1)
    assert left_shift_flags(differential_from_counts(one), one, 20, cfg()) == []  # 1%: within normal
    assert left_shift_flags(differential_from_counts(counts(Neutrophil=50)), counts(Neutrophil=50), 1, cfg()) == []
    # the generic differential rules do not judge immature granulocytes a second time
    assert "left_shift_pattern" not in names(differential_flags(c, differential_from_counts(c), 20, cfg()))


def test_few_wbcs_with_immature_granulocytes_is_insufficient_evidence_that_lists_them():
    c = counts(rbc=500, plt=30, Neutrophil=7, ImmatureGranulocyte=1)
    (f,) = left_shift_flags(differential_from_counts(c), c, 1, cfg())
    assert f.severity == "insufficient evidence" and "1 immature granulocyte of 8 WBCs" in f.observed
    assert_complete(f)


def test_any_nrbc_is_worth_review_and_a_single_one_says_it_is_thin():
    c = {**counts(rbc=5000, plt=300, Neutrophil=60, Lymphocyte=40), "Erythroblast": 1}
    (f,) = nrbc_flags(differential_from_counts(c), c, 20)
    assert f.name == "nrbc_present" and f.severity == "warning"
    assert f.observed == "1 nucleated RBC (1.0 per 100 WBCs, 100 WBCs)" and "thin evidence" in f.caveat
    assert "nrbc_present" in names(compute_flags(c, differential_from_counts(c), 20, cfg()))
    c3 = {**c, "Erythroblast": 3}
    assert "thin evidence" not in nrbc_flags(differential_from_counts(c3), c3, 20)[0].caveat
    assert nrbc_flags(differential_from_counts(counts(Neutrophil=5)), counts(Neutrophil=5), 1) == []


# ---------------------------------------------------------------- RBC morphology

def test_summary_counts_cells_with_a_call():
    cells = cells_with_morphology({"normal": 490, "schistocyte": 10}) + [make_cell("WBC")]
    s = summarize_morphology(cells)
    assert s["n_rbc"] == 500
    assert s["counts"]["schistocyte"] == 10 and s["percent"]["schistocyte"] == 2.0
    assert set(MORPHOLOGY_CLASSES) <= set(s["counts"])
    assert summarize_morphology([])["percent"]["normal"] is None


def test_schistocytes_over_one_percent_flag():
    s = summarize_morphology(cells_with_morphology({"normal": 490, "schistocyte": 10}))
    flags = morphology_flags(s, {"RBC": 500}, 12)
    assert [f.name for f in flags] == ["schistocytes"]
    f = flags[0]
    assert isinstance(f, Flag) and f.severity == "warning" and f.threshold == "> 1%"
    assert f.observed.startswith("2.0%") and f.evidence["fields"] == 12 and f.evidence["rbc_with_morphology"] == 500
    assert "haemoglobin" in f.caveat
    assert morphology_flags(summarize_morphology(cells_with_morphology({"normal": 496, "schistocyte": 4})), {"RBC": 500}, 1) == []


def test_microcytic_hypochromic_pattern_pools_both_labels():
    s = summarize_morphology(cells_with_morphology({"normal": 440, "microcyte": 30, "hypochromia": 30}))
    assert [f.name for f in morphology_flags(s, {"RBC": 500}, 3)] == ["microcytic_hypochromic_pattern"]


def test_few_rbcs_give_insufficient_evidence():
    s = summarize_morphology(cells_with_morphology({"normal": 40, "schistocyte": 10}))
    flags = morphology_flags(s, {"RBC": 50}, 1)
    assert len(flags) == 1 and flags[0].severity == "insufficient evidence"
    assert str(MIN_RBC_FOR_MORPHOLOGY) in flags[0].threshold and "50" in flags[0].observed
    assert morphology_flags(None, {}, 0) == []


# ---------------------------------------------------------------- count quality

@pytest.mark.parametrize("coverage, expect", [(0.6, "insufficient evidence"), (0.95, "warning"), (None, "warning")])
def test_ratio_flags_rest_on_how_completely_the_rbcs_were_found(coverage, expect):
    """Half the RBCs missed doubles the platelet:RBC ratio: below the coverage floor the flag says so instead."""
    cfg = PipelineConfig()
    counts = {"RBC": 1000, "Platelets": 150, "WBC": 3}  # 150 per 1,000 RBC: a thrombocytosis pattern if real
    flags = platelet_flags(counts, 20, cfg, rbc_coverage=coverage)
    assert len(flags) == 1 and flags[0].severity == expect
    if expect == "insufficient evidence":
        assert flags[0].name == "platelet_ratio" and "60%" in flags[0].observed
        assert flags[0].evidence["rbc_coverage"] == 0.6
    else:
        assert flags[0].name == "thrombocytosis_pattern"


def test_rbc_coverage_measures_the_share_of_red_cell_pixels_in_rbc_boxes():
    from smear.data.taxonomy import GROUPS
    from smear.pipeline.quality import rbc_coverage

    img, boxes = draw_field(seed=3, n_rbc=12, n_wbc=1, n_plt=2)
    b = np.array([bx for _, bx in boxes], float)
    c = np.array([GROUPS.index("RBC" if lab == "RBC" else "WBC" if lab == "WBC" else "Platelets") for lab, _ in boxes])
    full = rbc_coverage(img, b, c)
    rbc_rows = np.flatnonzero(c == 0)
    half = np.concatenate([rbc_rows[: len(rbc_rows) // 2], np.flatnonzero(c != 0)])
    assert full > 0.9
    assert rbc_coverage(img, b[half], c[half]) == pytest.approx(0.5, abs=0.15)
    assert rbc_coverage(img, b[c != 0], c[c != 0]) == 0.0
    assert rbc_coverage(np.full((64, 64, 3), 230, np.uint8), np.zeros((0, 4)), np.zeros(0, int)) in (None, 0.0)
