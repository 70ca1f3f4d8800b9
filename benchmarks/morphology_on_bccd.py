"""Domain check: the Chula-trained morphology stage on BCCD's ground-truth RBC boxes (test split).

BCCD has no morphology labels; its donors are not selected for RBC disease, so most cells
should come out ``normal``. A distribution far from that says the stage does not transfer to
BCCD's stain and scale, and its calls on BCCD-like fields must not be trusted.

Appends a tidy table (one row per RBC box) to benchmarks/results/morphology_on_bccd.csv
(benchmarks/_results.py: date, commit, machine, device, variant, seed first; --variant defaults to
the morphology model folder's name, or ``shipped``) and prints the label distribution, overall and
per image (median share of normal).

    python benchmarks/morphology_on_bccd.py [--weights FOLDER] [--threads 1]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from _results import append_rows, model_name, results_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="morphology model folder; default: the shipped one")
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(results_csv("morphology_on_bccd")), help="table the rows are appended to")
    ap.add_argument("--variant", default=None,
                    help="name of this run in the table (default: the morphology folder's name, or 'shipped')")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from smear.classifier.predict import load_morphology_model
    from smear.configs.paths import resolve_path
    from smear.data.formats import read_voc
    from smear.data.images import read_image
    from smear.data.taxonomy import MORPHOLOGY_CLASSES
    from smear.pipeline.flags import summarize_morphology
    from smear.pipeline.results import Cell

    model = load_morphology_model(args.weights)
    images = [a for a in read_voc(resolve_path(args.data)) if a.split == args.split]
    rows, all_cells = [], []
    for ai in images:
        boxes = [b for b in ai.boxes if b.label == "RBC" and b.x2 > b.x1 and b.y2 > b.y1]
        if not boxes:
            continue
        cells = [Cell(box=list(b.xyxy), group="RBC", label="RBC", score=1.0, detector={}, classifier={}) for b in boxes]
        model.annotate(read_image(ai.image_path), cells)
        side = model.crop_sides([c.box for c in cells])[0]
        for c in cells:
            rows.append({"split": args.split, "image_id": ai.image_id,
                         "x1": c.box[0], "y1": c.box[1], "x2": c.box[2], "y2": c.box[3],
                         "morphology": c.morphology["label"], "score": c.morphology["score"],
                         "crop_side_px": round(side, 1)})
        all_cells += cells
    out = append_rows(args.output, rows, variant=args.variant or model_name(args.weights))

    # Summaries from the table only.
    counts = Counter(r["morphology"] for r in rows)
    n = len(rows)
    print(f"model {model.folder}; BCCD {args.split}: {len({r['image_id'] for r in rows})} images, {n} RBC boxes")
    for lab in MORPHOLOGY_CLASSES:
        print(f"  {lab:<14} {counts.get(lab, 0):5d}  {100 * counts.get(lab, 0) / n:5.1f}%")
    per_image = Counter(r["image_id"] for r in rows)
    normal = Counter(r["image_id"] for r in rows if r["morphology"] == "normal")
    shares = [normal[i] / per_image[i] for i in per_image]
    print(f"share called normal per image: median {np.median(shares):.2f}, "
          f"10th-90th percentile {np.percentile(shares, 10):.2f}-{np.percentile(shares, 90):.2f}")
    print(f"median score {np.median([r['score'] for r in rows]):.3f}")
    print(f"summarize_morphology percent: {summarize_morphology(all_cells)['percent']}")
    print(f"table: {out}")


if __name__ == "__main__":
    main()
