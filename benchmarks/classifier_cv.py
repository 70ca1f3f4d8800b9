"""Grouped 5-fold cross-validation of the crop classifier over BCCD train + val (never test).

Folds are made by source image (sklearn GroupKFold), so no image has crops on both sides.
Each fold trains the shipped model's recipe for a fixed number of epochs (its chosen best
epoch; no early stopping on the held-out fold) and predicts the held-out crops. One row per
held-out crop is appended, fold by fold, to benchmarks/results/classifier_cv.csv with the run's
variant (``--variant``), seed and device (benchmarks/_results.py); the summary is computed from
those rows. A stored run is named VARIANT[:SEED[:DEVICE]] (``--summary-only``, ``--ensemble``).

    python benchmarks/classifier_cv.py --weights runs/classifier/mnv2-128-nohue/model --variant mnv2-128-nohue

A recipe can also be given without a trained folder, as overrides of the base recipe
(the shipped model's, or ``--weights``), e.g. the WBC-subtype model:

    python benchmarks/classifier_cv.py --set classes=subtypes crop_size_px=128 --epochs 14 --variant sub-mnv2-128
    python benchmarks/classifier_cv.py --set classes=subtypes seed=1 --epochs 14 --variant sub-mnv2-128   # seed 1
    python benchmarks/classifier_cv.py --ensemble sub-mnv2-128:0:cpu sub-mnv2-128:1 --variant sub-ens2-128
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace

from _results import STANDARD, append_rows, latest_run, read_rows, results_csv, run_stamp
from classifier_labs import MIN_SUPPORT, balanced_accuracy_supported


def summarize(rows: list[dict]) -> dict:
    from smear.classifier.evaluate import classification_report
    from smear.data.taxonomy import CELL_CLASSES

    rep = classification_report([r["true"] for r in rows], [r["pred"] for r in rows], CELL_CLASSES)
    per_fold = {}
    for f in sorted({r["fold"] for r in rows}):
        fr = [r for r in rows if r["fold"] == f]
        per_fold[f] = classification_report([r["true"] for r in fr], [r["pred"] for r in fr], CELL_CLASSES).get(
            "subtype", {}).get("accuracy")
    sub = rep.get("subtype") or {}
    return {"groups_accuracy": rep["groups"]["accuracy"], "accuracy": rep["accuracy"], "subtype": rep.get("subtype"),
            f"subtype_balanced_accuracy_support{MIN_SUPPORT}": balanced_accuracy_supported(sub.get("recall", {}),
                                                                                           sub.get("support", {})),
            "subtype_accuracy_per_fold": per_fold}


def own_columns(rows: list[dict]) -> list[dict]:
    """One stored run's rows without the standard columns and the columns other runs brought (empty here)."""
    keep = [c for c in (rows[0] if rows else {}) if c not in STANDARD and any(r[c] != "" for r in rows)]
    return [{c: r[c] for c in keep} for r in rows]


def ensemble_rows(tables: list[list[dict]]) -> list[dict]:
    """Average the ``p_<class>`` columns of several CV tables crop by crop (same folds, same crops)."""
    key = ("fold", "image_id", "x1", "y1", "x2", "y2")
    index = [{tuple(r[k] for k in key): r for r in t} for t in tables]
    if any(set(ix) != set(index[0]) for ix in index) or any(len(ix) != len(t) for ix, t in zip(index, tables)):
        raise SystemExit("ensemble: the tables do not hold the same folds and crops")
    cols = [c for c in tables[0][0] if c.startswith("p_")] if tables[0] else []
    if not cols or any(c not in t[0] for t in tables for c in cols):
        raise SystemExit("ensemble: a table has no probability columns (rerun its CV to write them)")
    rows = []
    for r in tables[0]:
        k = tuple(r[c] for c in key)
        mean = {c: sum(float(ix[k][c]) for ix in index) / len(index) for c in cols}
        best = max(mean, key=mean.get)
        rows.append({**{c: r[c] for c in key}, "true": r["true"], "pred": best[2:], "score": round(mean[best], 4),
                     **{c: round(v, 5) for c, v in mean.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="model folder whose recipe is cross-validated (default: shipped)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="phase-2 epochs (default: the model's best epoch)")
    ap.add_argument("--variant", "--tag", default="shipped",
                    help="name of this run in classifier_cv.csv (the seed and device are columns of their own)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (ClassifierConfig keys)")
    ap.add_argument("--summary-only", action="store_true",
                    help="recompute the summary of the latest stored run --variant VARIANT[:SEED[:DEVICE]]")
    ap.add_argument("--ensemble", nargs="+", default=None, metavar="VARIANT[:SEED[:DEVICE]]",
                    help="summarize the mean of the per-class probabilities of these stored runs (same folds) and "
                         "append it as --variant; no training")
    args = ap.parse_args()
    out = results_csv("classifier_cv")
    if args.ensemble:
        stored = read_rows(out)
        try:
            members = [latest_run(stored, spec) for spec in args.ensemble]
        except ValueError as e:
            raise SystemExit(f"ensemble: {e}")
        rows = ensemble_rows([own_columns(m) for m in members])
        devices = {m[0]["device"] for m in members}
        append_rows(out, rows, variant=args.variant, device=devices.pop() if len(devices) == 1 else "mixed")
        summary = summarize(rows)
        summary["ensemble_of"] = [f"{m[0]['variant']}:{m[0]['seed']}:{m[0]['device']}" for m in members]
        print(json.dumps(summary, indent=2))
        print(f"rows: {out} (variant {args.variant})")
        return
    if args.summary_only:
        try:
            rows = latest_run(read_rows(out), args.variant)
        except ValueError as e:
            raise SystemExit(f"summary: {e}")
        r = rows[0]
        print(f"{r['variant']} seed {r['seed']} on {r['device']}, {r['date']} ({r['commit']})")
        print(json.dumps(summarize(rows), indent=2))
        return

    import numpy as np
    from sklearn.model_selection import GroupKFold

    from smear.classifier.config import ClassifierConfig
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import predict_crops
    from smear.classifier.train import eval_crops, model_classes, train_classifier
    from smear.configs.loader import build_config, parse_overrides
    from smear.configs.paths import resolve_path
    from smear.data.crops import ImageCache, read_manifest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = load_classifier(args.weights)
    card_cfg = dict(base.card["config"])
    card_cfg.update(parse_overrides(args.set))
    cfg = build_config(ClassifierConfig, card_cfg)
    phase2 = args.epochs if args.epochs is not None else max(1, int(base.card.get("best_epoch", 0)) - cfg.frozen_epochs)
    rows_all = [r for r in read_manifest(resolve_path(cfg.manifest), model_classes(cfg)) if r.split in ("train", "val")]
    groups = [r.image_id for r in rows_all]
    stamp = run_stamp(args.variant, cfg.seed, cfg.device)  # before training: the code that ran
    rows: list[dict] = []
    t0 = time.time()
    for fold, (tr, te) in enumerate(GroupKFold(n_splits=args.folds).split(rows_all, groups=groups)):
        fcfg = replace(cfg, epochs=phase2, threads=args.threads, name=f"cv-{args.variant}-s{cfg.seed}-fold{fold}",
                       project="runs/classifier_cv", val_split="none")
        train_rows = [rows_all[i] for i in tr]
        test_rows = [rows_all[i] for i in te]
        folder = train_classifier(fcfg, resume=True, train_rows=train_rows, val_rows=[])
        model = load_classifier(folder)
        probs = predict_crops(model, eval_crops(test_rows, ImageCache(), model.crop_size_px, model.crop_margin))
        fold_rows = [{"fold": fold, "image_id": r.image_id, "x1": r.box[0], "y1": r.box[1], "x2": r.box[2],
                      "y2": r.box[3], "true": r.label, "pred": model.classes[int(np.argmax(p))],
                      "score": round(float(np.max(p)), 4),
                      **{f"p_{c}": round(float(q), 5) for c, q in zip(model.classes, p)}}
                     for r, p in zip(test_rows, probs)]
        append_rows(out, fold_rows, stamp=stamp)
        rows += fold_rows
        logging.info("fold %d done (%.1f min so far)", fold, (time.time() - t0) / 60)
    summary = summarize(rows)
    summary["recipe"] = {"backbone": cfg.backbone, "crop_size_px": cfg.crop_size_px, "phase2_epochs": phase2,
                         "folds": args.folds, "minutes": round((time.time() - t0) / 60, 1), "overrides": args.set}
    print(json.dumps(summary, indent=2))
    print(f"rows: {out} (variant {args.variant}, seed {cfg.seed}, {cfg.device})")


if __name__ == "__main__":
    main()
