"""Counts of the same fields at other pixel sizes: does ``scale: auto`` find the cells of a 4x or 0.5x field?

Each field is resized by every factor (a 640x480 BCCD field at 4x is 2560x1920, like a large camera frame)
and detected as ``smear analyze`` does (``scale: auto``, the card's operating thresholds, edge fragments
dropped). One row per field and factor goes to ``benchmarks/results/scale_invariance.csv``; the printed
summary compares each factor's total count per group with the native one, computed from those rows.

Example:
    python benchmarks/scale_invariance.py --split test --factors 1 4 0.5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, model_name, results_csv, run_stamp  # noqa: E402

GROUPS = ("RBC", "WBC", "Platelets")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="detector model folder (default: the shipped one)")
    ap.add_argument("--bccd", default="../shared/data/bccd", help="BCCD folder (JPEGImages, ImageSets)")
    ap.add_argument("--split", default="test", help="BCCD split whose fields are resized")
    ap.add_argument("--factors", nargs="+", type=float, default=[1.0, 4.0, 0.5], help="resize factors; 1 first")
    ap.add_argument("--rbc-rescue", action="store_true", help="keep RBC boxes under the threshold where red-cell "
                    "pixels are left uncovered, as smear analyze with rbc_rescue does")
    ap.add_argument("--variant", help="run name (default: the model folder's name)")
    ap.add_argument("--out", type=Path, default=results_csv("scale_invariance"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import cv2
    import numpy as np

    from smear.configs.paths import resolve_path
    from smear.data.images import read_image
    from smear.detector.coverage import detect_with_rescued_rbcs
    from smear.detector.predict import Detector, drop_edge_fragments
    from smear.pipeline.config import PipelineConfig

    det = Detector(args.weights)
    cfg = PipelineConfig()
    thresholds = cfg.thresholds(det.info.card)
    root = resolve_path(args.bccd)
    names = (root / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    stamp = run_stamp((args.variant or model_name(args.weights)) + ("+rbc-rescue" if args.rbc_rescue else ""))
    rows = []
    for name in names:
        img = read_image(root / "JPEGImages" / f"{name}.jpg")
        for k in args.factors:
            im = img if k == 1 else cv2.resize(img, None, fx=k, fy=k,
                                               interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
            d = (detect_with_rescued_rbcs(det, im, thresholds) if args.rbc_rescue
                 else det.predict([im], conf=thresholds, scale="auto")[0])
            d = drop_edge_fragments(d, (im.shape[1], im.shape[0]), cfg.edge_fragment_min)
            rows.append({"split": args.split, "image": name, "factor": k, "width": im.shape[1], "height": im.shape[0],
                         "scale": round(d.scale, 4), "warning": d.warning or "",
                         **{f"n_{g}": int((d.classes == i).sum()) for i, g in enumerate(GROUPS)}})
    for k in args.factors:
        at = [r for r in rows if r["factor"] == k]
        line = [f"x{k:g}: {len(at)} fields, median scale {np.median([r['scale'] for r in at]):.3f}"]
        for g in GROUPS:
            n = sum(r[f"n_{g}"] for r in at)
            ref = sum(r[f"n_{g}"] for r in rows if r["factor"] == args.factors[0])
            line.append(f"{g} {n} ({100 * (n - ref) / max(ref, 1):+.1f}%)")
        print(" | ".join(line))
    out = append_rows(args.out, rows, stamp=stamp)
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
