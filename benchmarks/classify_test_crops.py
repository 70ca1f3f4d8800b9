"""Issue 4 check through the user path: `smear classify` over the written test crops.

Runs the shipped (or --weights) classifier on every crop file of a prepared split
(``crops/<split>/<label>/*.png``, written by `smear data prepare`), the way `smear classify`
does, and prints 3-group accuracy, WBC-subtype accuracy / balanced accuracy and per-class
recall. Rows (one per crop, with its split) are appended to benchmarks/results/classify_test_crops.csv
(benchmarks/_results.py: date, commit, machine, device, variant, seed first; --variant defaults to
the classifier folder's name, or ``shipped``).

    python benchmarks/classify_test_crops.py [--crops runs/prepared/bccd/crops] [--split test]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _results import append_rows, model_name, results_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", default="runs/prepared/bccd/crops")
    ap.add_argument("--split", default="test")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--variant", default=None,
                    help="name of this run in the table (default: the classifier folder's name, or 'shipped')")
    args = ap.parse_args()

    from smear.classifier.evaluate import classification_report
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_files
    from smear.configs.paths import resolve_path

    root = resolve_path(args.crops) / args.split
    model = load_classifier(args.weights)
    files = sorted(p for p in root.rglob("*.png") if p.parent.name in model.classes)
    if not files:
        raise SystemExit(f"{root}: no crops; run 'smear data prepare' first")
    records = classify_files(model, files)
    rows = [{"split": args.split, "crop": r["image"], "true": Path(r["image"]).parent.name,
             "pred": r.get("label", ""), "score": r.get("score", ""), "error": r.get("error", "")} for r in records]
    out = append_rows(results_csv("classify_test_crops"), rows, variant=args.variant or model_name(args.weights))
    ok = [r for r in rows if not r["error"]]
    rep = classification_report([r["true"] for r in ok], [r["pred"] for r in ok], model.classes)
    print(f"classifier {model.folder} ({model.card['config']['backbone']} @ {model.crop_size_px} px), "
          f"{len(ok)} {args.split} crops via classify")
    print(f"3-group accuracy: {rep['groups']['accuracy']:.4f}")
    print(f"7-class accuracy: {rep['accuracy']:.4f}")
    if "subtype" in rep:
        s = rep["subtype"]
        print(f"WBC subtype accuracy: {s['accuracy']:.4f} (n={s['n']}), balanced accuracy {s['balanced_accuracy']:.4f}")
        print("subtype recall: " + ", ".join(f"{k} {v:.2f} (n={s['support'][k]})" for k, v in s["recall"].items()))
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
