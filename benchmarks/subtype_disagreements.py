"""WBC subtype labels the model disagrees with, for expert review, and the reviewed labels applied back.

The subtype stage plateaus near 0.88 in grouped cross-validation whatever the recipe; many of
its confident errors look like label errors (BCCD subtype labels are per image, from a public
table, without expert review). This script turns the out-of-fold predictions of
``benchmarks/classifier_cv.py`` into a review sheet a haematology technologist can work through:

    python benchmarks/subtype_disagreements.py                       # review.csv + sheet.jpg
    python benchmarks/subtype_disagreements.py --apply runs/subtype-review/review.csv \\
        --out runs/wbc_subtypes_reviewed.csv                       # after filling 'reviewed'
    smear data prepare --out runs/prepared/bccd-reviewed subtypes_csv=runs/wbc_subtypes_reviewed.csv

``review.csv`` lists every WBC whose out-of-fold prediction differs from its label, most confident
first, with an empty ``reviewed`` column (one of the five subtypes, or ``unclear``); ``sheet.jpg``
shows the first ``--sheet`` of them with label, prediction and probability. ``--apply`` writes a copy
of the subtype table with the reviewed labels in place (``unclear`` removes the image's label, so it
leaves subtype training) and prints what changed. Prints the disagreement counts it finds.

The CV rows are those of one stored run of benchmarks/results/classifier_cv.csv, ``--variant
VARIANT[:SEED[:DEVICE]]`` (default: the shipped subtype model's CV, ``sub-mnv2-128:0:cpu``); a table
without the standard columns of benchmarks/_results.py is read whole. ``--store`` appends the
disagreements to benchmarks/results/subtype_disagreements.csv under that run's variant, seed and device.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SUBTYPE_ORDER = ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil")
REVIEW_COLUMNS = ("image_id", "x1", "y1", "x2", "y2", "label", "predicted", "p_predicted", "p_label", "fold",
                  "reviewed")


def disagreements(cv_rows: list[dict]) -> list[dict]:
    """Rows whose prediction differs from the label, most confident first (by p_predicted - p_label)."""
    out = []
    for r in cv_rows:
        if r["pred"] == r["true"]:
            continue
        p_pred, p_label = float(r[f"p_{r['pred']}"]), float(r[f"p_{r['true']}"])
        out.append({"image_id": r["image_id"], "x1": r["x1"], "y1": r["y1"], "x2": r["x2"], "y2": r["y2"],
                    "label": r["true"], "predicted": r["pred"], "p_predicted": round(p_pred, 4),
                    "p_label": round(p_label, 4), "fold": r["fold"], "reviewed": ""})
    out.sort(key=lambda d: d["p_label"] - d["p_predicted"])
    return out


def image_number(image_id: str) -> int:
    """``BloodImage_00012`` -> 12 (the subtype table's ``Image`` column)."""
    digits = "".join(ch for ch in image_id.rsplit("_", 1)[-1] if ch.isdigit())
    if not digits:
        raise ValueError(f"{image_id}: no image number in the name")
    return int(digits)


def apply_review(review_rows: list[dict], subtypes_rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The subtype table with reviewed labels applied; and one line per change.

    Raises:
        ValueError: a ``reviewed`` value that is not a subtype or ``unclear``, or an image the table lacks.
    """
    by_number = {int(r["Image"]): r for r in subtypes_rows if str(r.get("Image", "")).strip()}
    changes = []
    for r in review_rows:
        value = (r.get("reviewed") or "").strip()
        if not value:
            continue
        canon = next((s for s in SUBTYPE_ORDER if s.lower() == value.lower()), None)
        if canon is None and value.lower() != "unclear":
            raise ValueError(f"{r['image_id']}: reviewed label {value!r} is not one of "
                             f"{', '.join(SUBTYPE_ORDER)} or 'unclear'")
        n = image_number(r["image_id"])
        if n not in by_number:
            raise ValueError(f"{r['image_id']}: not in the subtype table")
        new = canon.upper() if canon else ""
        old = by_number[n]["Category"]
        if new != old:
            by_number[n]["Category"] = new
            changes.append(f"{r['image_id']}: {old or '(none)'} -> {new or '(none: unclear)'}")
    return subtypes_rows, changes


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _sheet(rows: list[dict], images: Path, out: Path, tile: int = 112) -> None:
    import cv2

    from smear.data.crops import crop_cell
    from smear.data.images import read_image

    cols = 8
    n = len(rows)
    canvas = np.full(((n + cols - 1) // cols * (tile + 30), cols * tile, 3), 255, np.uint8)
    for k, r in enumerate(rows):
        img = read_image(images / f"{r['image_id']}.jpg")
        crop = crop_cell(img, [float(r[c]) for c in ("x1", "y1", "x2", "y2")], 0.15, tile)
        y, x = (k // cols) * (tile + 30), (k % cols) * tile
        canvas[y:y + tile, x:x + tile] = crop
        for j, text in enumerate((f"{k + 1}. label {r['label'][:4]}",
                                  f"pred {r['predicted'][:4]} {float(r['p_predicted']):.2f}")):
            cv2.putText(canvas, text, (x + 2, y + tile + 11 + 12 * j), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
    cv2.imwrite(str(out), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cv", type=Path, default=Path(__file__).parent / "results" / "classifier_cv.csv",
                    help="out-of-fold predictions written by benchmarks/classifier_cv.py")
    ap.add_argument("--variant", default="sub-mnv2-128:0:cpu", metavar="VARIANT[:SEED[:DEVICE]]",
                    help="the stored CV run to review (default: the shipped subtype model's)")
    ap.add_argument("--store", action="store_true",
                    help="append the disagreements to benchmarks/results/subtype_disagreements.csv")
    ap.add_argument("--images", type=Path, default=None, help="BCCD JPEGImages (default: from DataConfig)")
    ap.add_argument("--output", type=Path, default=Path("runs/subtype-review"), help="folder for review.csv, sheet.jpg")
    ap.add_argument("--sheet", type=int, default=48, help="disagreements shown in sheet.jpg")
    ap.add_argument("--apply", type=Path, default=None, help="a reviewed review.csv: write the corrected table")
    ap.add_argument("--subtypes", type=Path, default=None, help="subtype table to correct (default: DataConfig's)")
    ap.add_argument("--out", type=Path, default=Path("runs/wbc_subtypes_reviewed.csv"), help="corrected table")
    args = ap.parse_args(argv)

    from smear.configs.paths import resolve_path
    from smear.data.config import DataConfig

    data_cfg = DataConfig()
    if args.apply:
        subtypes = args.subtypes or resolve_path(data_cfg.subtypes_csv)
        fields, table = _read_csv(subtypes)
        _, review = _read_csv(args.apply)
        try:
            table, changes = apply_review(review, table)
        except ValueError as e:
            print(f"{args.apply}: {e}", file=sys.stderr)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(table)
        print("\n".join(changes) or "no label changed")
        print(f"{len(changes)} label(s) changed; written to {args.out}")
        return 0

    if not args.cv.is_file():
        print(f"{args.cv}: not found; run benchmarks/classifier_cv.py first", file=sys.stderr)
        return 1
    fields, cv_rows = _read_csv(args.cv)
    variant, seed, device = (args.variant.split(":") + ["", ""])[:3]  # VARIANT[:SEED[:DEVICE]]
    run = {"variant": variant, "seed": seed, "device": device or "cpu"}
    if "variant" in fields:  # a stored table of several runs (benchmarks/_results.py): the one under review
        from _results import latest_run

        try:
            cv_rows = latest_run(cv_rows, args.variant)
        except ValueError as e:
            print(f"{args.cv}: {e}", file=sys.stderr)
            return 1
        run = {k: cv_rows[0][k] for k in run}
    rows = disagreements(cv_rows)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "review.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REVIEW_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    images = args.images or resolve_path(data_cfg.source) / "JPEGImages"
    if rows and args.sheet > 0:
        _sheet(rows[: args.sheet], images, args.output / "sheet.jpg")

    n = len(cv_rows)
    confident = [r for r in rows if r["p_predicted"] >= 0.9]
    print(f"{args.cv} ({run['variant']}, seed {run['seed'] or '-'}, {run['device']}): "
          f"{n} subtype-labelled WBCs, {len(rows)} predicted otherwise out of fold "
          f"(accuracy {1 - len(rows) / n:.3f}); {len(confident)} of them at p >= 0.9, "
          f"{sum(r['p_label'] < 0.05 for r in rows)} with p(label) < 0.05")
    print("label -> predicted: " + ", ".join(f"{a} -> {b} {c}" for (a, b), c in
                                            Counter((r["label"], r["predicted"]) for r in rows).most_common()))
    print(f"written: {args.output / 'review.csv'}" + (f", {args.output / 'sheet.jpg'}" if rows else ""))
    if args.store:
        from _results import append_rows, results_csv

        print(f"rows: {append_rows(results_csv('subtype_disagreements'), rows, **run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
