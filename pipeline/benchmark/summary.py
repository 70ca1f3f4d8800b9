"""The benchmark summary, computed only from the tables, and its views: ``summary.md`` and the lines
``smear benchmark`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from smear.data.taxonomy import GROUPS, SUBTYPES

from ..config import PipelineConfig
from .metrics import ap_metrics, attribution, cell_metrics, image_metrics, set_flags
from .tables import MODES, read_tables

BCCD_NOTE = ("BCCD labels are incomplete for RBCs (many RBCs, mostly at the border and in clumps, carry no box), so "
             "some correct RBC detections count as false detections: RBC precision, RBC AP and RBC count errors "
             "understate the models.")


def summarize(output: Path, cfg: PipelineConfig | None = None) -> dict[str, Any]:
    """The benchmark summary, computed only from the CSV tables in ``output``."""
    cfg = cfg or PipelineConfig()
    cells, detections, images = read_tables(Path(output))
    summary: dict[str, Any] = {"cell": {}, "image": {}}
    for m in MODES:
        summary["cell"][m] = {**ap_metrics(detections, cells, m), **cell_metrics(cells, m)}
        summary["image"][m] = image_metrics(images, m)
    summary["image"]["set_flags"] = set_flags(images, cfg)
    summary["attribution"] = attribution(cells)
    return summary


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _conf_text(run: Mapping[str, Any]) -> str:
    """The operating threshold as text: ``0.4``, or ``0.4 (Platelets 0.55)`` where a class has its own."""
    conf = run.get("operating_conf", "")
    own = {g: t for g, t in (run.get("operating_thresholds") or {}).items() if t != conf}
    return f"{conf}" + (" (" + ", ".join(f"{g} {t:g}" for g, t in own.items()) + ")" if own else "")


def summary_markdown(s: dict[str, Any]) -> str:
    """``summary.md``: the summary as tables, with the caveats that go with them."""
    run = s.get("run", {})
    cd, cp = s["cell"]["detector"], s["cell"]["pipeline"]
    idt, ipl = s["image"]["detector"], s["image"]["pipeline"]
    lines = [f"# smear benchmark: {run.get('split', '')} split", "",
             f"Data: `{run.get('data', '')}`; {run.get('n_images', '')} images ({run.get('n_failed', 0)} failed); "
             f"operating conf {_conf_text(run)}, ranked list from conf {run.get('ranking_conf', '')}; "
             f"commit {run.get('commit', '')}.", ""]
    lines += ["Every figure below is computed from `cells.csv`, `detections.csv` and `images.csv` in this folder.",
              "*detector* = the detector's own group and score; *pipeline* = the final merged group and score.", ""]
    if run.get("bccd_rbc_labels_incomplete", True):
        lines += [f"**Note:** {BCCD_NOTE}", ""]
    lines += ["## Cells", "", "| metric | detector | pipeline |", "|---|---|---|"]
    for k in ("mAP50", "mAP50_95", "precision", "recall", "F1"):
        lines.append(f"| {k} | {_fmt(cd[k])} | {_fmt(cp[k])} |")
    for g in GROUPS:
        for k in ("AP50", "AP50_95"):
            lines.append(f"| {k} {g} | {_fmt(cd[k][g])} | {_fmt(cp[k][g])} |")
        for k in ("precision", "recall", "F1"):
            lines.append(f"| {k} {g} | {_fmt(cd['per_class'][g][k])} | {_fmt(cp['per_class'][g][k])} |")
    sub = cp.get("subtype", {})
    if sub.get("n_true"):
        lines += ["", f"WBC subtype (pipeline, {sub['n_matched']} of {sub['n_true']} subtyped WBCs matched): "
                      f"accuracy {_fmt(sub['accuracy'])}; recall "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in sub["recall"].items())]
    lines += ["", "## Who made the errors (operating conf, class-agnostic matching at IoU 0.5)", "",
              "| outcome | cells |", "|---|---|"]
    att = s["attribution"]
    lines += [f"| {o} | {n} |" for o, n in att["outcomes"].items()]
    lines += ["", "| share of pipeline errors | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in att["share_of_pipeline_errors"].items()]
    lines += ["", f"Classifier net effect on group calls: {att['classifier_net_effect']:+d} cells "
                  "(detector errors it corrected minus correct detections it broke).", ""]
    lines += ["## Images", "", "| class | MAE detector | MAE pipeline | rel. error detector | rel. error pipeline |",
              "|---|---|---|---|---|"]
    for c in (*GROUPS, *SUBTYPES):
        lines.append(f"| {c} | {_fmt(idt['count_MAE'].get(c))} | {_fmt(ipl['count_MAE'].get(c))} | "
                     f"{_fmt(idt['count_rel_err'].get(c))} | {_fmt(ipl['count_rel_err'].get(c))} |")
    sf = s["image"]["set_flags"]
    lines += ["", f"Flag agreement per image (same decisive flags as from the true counts): detector "
                  f"{_fmt(idt['flag_agreement'])}, pipeline {_fmt(ipl['flag_agreement'])}. Single fields rarely "
                  "hold enough cells for a decisive flag, so most per-image flags are 'insufficient evidence'.",
              "", f"Flags over all {sf['n_fields']} fields together: true "
                  f"{', '.join(sf['true']['flags']) or 'none'}; detector {', '.join(sf['detector']['flags']) or 'none'}; "
                  f"pipeline {', '.join(sf['pipeline']['flags']) or 'none'}.",
              "", "Subtype count errors use only images where every true WBC has a known subtype.", ""]
    for g, a in ipl.get("audited", {}).items():
        lines[-1:] = [f"Audited labels: the data audit found {len(a['left_out'])} image(s) whose {g} boxes are "
                      f"missing or wrong (a WBC without its box, or boxed as a platelet); without them the {g} count "
                      f"MAE is detector "
                      f"{_fmt(idt.get('audited', {}).get(g, {}).get('count_MAE'))}, pipeline {_fmt(a['count_MAE'])} "
                      f"({a['n_images']} images). Left out: {', '.join(a['left_out'])}.", ""]
    return "\n".join(lines)


def summary_text(s: dict[str, Any], output: Path) -> str:
    """The few lines ``smear benchmark`` prints."""
    run = s.get("run", {})
    cd, cp = s["cell"]["detector"], s["cell"]["pipeline"]
    att = s["attribution"]
    mae = s["image"]["pipeline"]["count_MAE"]
    lines = [f"benchmark: {run.get('n_images')} {run.get('split')} images, {cp['n_true']} true cells, "
             f"operating conf {_conf_text(run)}",
             f"  mAP50     detector {_fmt(cd['mAP50'])}  pipeline {_fmt(cp['mAP50'])}",
             f"  mAP50-95  detector {_fmt(cd['mAP50_95'])}  pipeline {_fmt(cp['mAP50_95'])}",
             f"  F1        detector {_fmt(cd['F1'])}  pipeline {_fmt(cp['F1'])}",
             "  count MAE per image (pipeline): " + ", ".join(f"{g} {_fmt(mae[g])}" for g in GROUPS),
             *(f"  count MAE {g}, audited labels: {_fmt(a['count_MAE'])} ({len(a['left_out'])} image(s) whose "
               f"{g} boxes are missing or wrong left out: {', '.join(a['left_out'])})"
               for g, a in s["image"]["pipeline"].get("audited", {}).items()),
             f"  flag agreement per image: pipeline {_fmt(s['image']['pipeline']['flag_agreement'])}",
             "  outcomes: " + ", ".join(f"{k} {v}" for k, v in att["outcomes"].items()),
             f"  classifier net effect: {att['classifier_net_effect']:+d} cells"]
    if run.get("bccd_rbc_labels_incomplete"):
        lines.append("  note: BCCD RBC labels are incomplete; unlabelled RBCs count as false detections")
    lines.append(f"  written to {output}/ (cells.csv, detections.csv, images.csv, summary.json, summary.md, plots)")
    return "\n".join(lines)

