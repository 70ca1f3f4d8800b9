"""Counts as 'smear analyze' reports them, on completely labelled fields of each source, for one or more settings.

Where ``detector_sources.py`` scores the detector alone, this runs the whole pipeline (detector, classifier cascade,
the merge of their opinions) and compares each field's counts with its labels: RBCs as smear counts them (border
fragments under ``edge_fragment_min`` of a typical cell left out, in the labels too), nucleated cells (WBCs and
nucleated RBCs: the detector's WBC group) and platelets. Each ``--variant`` is a set of pipeline settings
(``key=value``, comma-separated; ``default`` for none); the variants take turns field by field in one run, so
their times are comparable, and every field's counts are printed where two variants differ on RBCs or platelets.

    python benchmarks/pipeline_counts.py --split train --variant wbc_rescue=0 --variant wbc_rescue=0.9

``--bccd-unrelabelled`` scores instead the BCCD train and val fields that bccd-relabel does not cover, against
BCCD's own boxes: complete for WBCs, so only the nucleated-cell count is judged there (BCCD boxes about half the
RBCs; the RBC and platelet columns are printed for the comparison between settings only).

One row per field and variant goes to ``benchmarks/results/pipeline_counts.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, run_stamp  # noqa: E402
from detector_sources import count_error  # noqa: E402


def settings(variant: str) -> dict:
    """``key=value,key=value`` (or ``default``) as pipeline overrides."""
    from smear.configs.loader import parse_overrides

    return {} if variant == "default" else parse_overrides(v for v in variant.split(",") if v.strip())


def bccd_unrelabelled(shared: Path) -> list:
    """The BCCD train and val fields without a bccd-relabel label file, as fields with BCCD's own boxes."""
    from smear.data.complete import Field
    from smear.data.formats import read_voc
    from smear.data.taxonomy import _canonical_label

    relabelled = {p.stem for p in (shared / "bccd-relabel" / "labels").glob("*.txt")}
    main_sets = shared / "bccd" / "ImageSets" / "Main"
    split_of = {i: s for s in ("train", "val") for i in (main_sets / f"{s}.txt").read_text().split()}
    out = []
    for ai in read_voc(shared / "bccd"):
        if ai.image_id in split_of and ai.image_id not in relabelled:
            out.append(Field(ai.image_path, "bccd-own-labels", split_of[ai.image_id],
                             [(_canonical_label(b.label), *b.xyxy) for b in ai.boxes]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared/data", help="the shared data folder")
    ap.add_argument("--split", default="val", choices=["train", "val", "all"])
    ap.add_argument("--sources", nargs="+", default=["bccd", "pbc", "raabin"])
    ap.add_argument("--variant", action="append", default=None,
                    help="pipeline settings key=value[,key=value] (repeat for each variant; default: 'default')")
    ap.add_argument("--bccd-unrelabelled", action="store_true",
                    help="the BCCD train/val fields bccd-relabel does not cover, against BCCD's own (WBC-complete) boxes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from smear.configs.loader import build_config
    from smear.configs.paths import resolve_path
    from smear.data.complete import list_fields
    from smear.data.images import read_image
    from smear.data.taxonomy import GROUPS
    from smear.detector.predict import Detections, drop_edge_fragments
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    variants = args.variant or ["default"]
    analyzers = {v: Analyzer(build_config(PipelineConfig, settings(v))) for v in variants}
    stamp = run_stamp(";".join(variants))
    shared = resolve_path(args.shared)
    if args.bccd_unrelabelled:
        fields = bccd_unrelabelled(shared)
        args.sources = ["bccd-own-labels"]
    else:
        fields = [f for f in list_fields(shared) if args.split in ("all", f.split) and f.source in args.sources]
    rows, seconds = [], {v: 0.0 for v in variants}
    for k, f in enumerate(fields):
        image = read_image(f.image)
        labelled = Detections(np.array([b[1:] for b in f.boxes], np.float32).reshape(-1, 4),
                              np.ones(len(f.boxes), np.float32),
                              np.array([GROUPS.index(b[0]) for b in f.boxes], np.int64))
        order = variants if k % 2 == 0 else variants[::-1]  # take turns, the order flipped every other field
        per_variant = {}
        for v in order:
            an = analyzers[v]
            t0 = time.perf_counter()
            result = an.analyze_arrays([image], [f.image.name])[0]
            seconds[v] += time.perf_counter() - t0
            kept = drop_edge_fragments(labelled, (image.shape[1], image.shape[0]), an.cfg.edge_fragment_min)
            c = result.counts
            per_variant[v] = {
                "split": f.split, "source": f.source, "image": f.image.name, "setting": v,
                "true_RBC": int((kept.classes == GROUPS.index("RBC")).sum()), "pred_RBC": c["RBC"],
                "true_nucleated": sum(b[0] == "WBC" for b in f.boxes), "pred_nucleated": c["WBC"] + c["Erythroblast"],
                "true_Platelets": sum(b[0] == "Platelets" for b in f.boxes), "pred_Platelets": c["Platelets"],
                "below_threshold_kept": sum(bool(cell.detector.get("below_threshold")) for cell in result.cells)}
        rows += [per_variant[v] for v in variants]
        first = per_variant[variants[0]]
        for v in variants[1:]:
            other = per_variant[v]
            if (other["pred_RBC"], other["pred_Platelets"]) != (first["pred_RBC"], first["pred_Platelets"]):
                print(f"{f.image.name}: RBC / platelets {first['pred_RBC']} / {first['pred_Platelets']} with "
                      f"{variants[0]}, {other['pred_RBC']} / {other['pred_Platelets']} with {v}")
    for s in args.sources:
        for v in variants:
            of = [r for r in rows if r["source"] == s and r["setting"] == v]
            if not of:
                continue
            parts = [f"{s:<7} {len(of):>4} fields  {v:<24}"]
            for g in ("RBC", "nucleated", "Platelets"):
                parts.append(f"{g} {count_error(of, f'true_{g}', f'pred_{g}')[1]}")
            parts.append(f"kept under the detector's threshold {sum(r['below_threshold_kept'] for r in of)}")
            print(" | ".join(parts))
    for v in variants:
        print(f"{v}: {seconds[v]:.1f} s over {len(fields)} fields ({seconds[v] / seconds[variants[0]]:.3f}x "
              f"{variants[0]})")
    out = append_rows(args.out or Path(__file__).resolve().parent / "results" / "pipeline_counts.csv", rows,
                      stamp=stamp)
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
