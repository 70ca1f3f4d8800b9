"""Classifier per lab: WBC subtype balanced accuracy, per-class recall and WBCs lost to the wrong group, on each
source's cells; and 'smear classifier adapt' with k cells per class of a lab.

Leave-one-lab-out: pass a model trained with ``exclude_sources=<lab>`` and read that lab's row (``--split all``:
every cell of a lab the model never saw). Figures on a lab the model trained on are not generalisation figures.

Subtype figures are over the cells whose true class is a WBC subtype, immature granulocyte or erythroblast (the
nucleated cells a differential names) and that the model can name; a nucleated cell called RBC or platelet counts as
wrong and is also reported as ``wbc_lost_to_group``. Group-only ``WBC`` rows (Raabin) give only that figure.

One row per cell goes to ``benchmarks/results/classifier_labs.csv`` (true, predicted, score); the summary printed
is computed from those rows.

Examples:
    python benchmarks/classifier_labs.py --weights runs/classifier/loso-no-pbc/model --sources pbc --split all
    python benchmarks/classifier_labs.py --weights runs/classifier/loso-no-pbc/model --sources pbc \\
        --adapt 5 10 25 50 --adapt-from train --split test
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, model_name, results_csv, run_stamp

from smear.classifier.config import SUBTYPE_VIEWS

MANIFESTS = "runs/prepared/bccd/crops/manifest.csv,runs/prepared/pbc/manifest.csv"
#: classes with fewer cells than this are left out of the second balanced accuracy printed
MIN_SUPPORT = 5


def balanced_accuracy_supported(recall: dict[str, float], support: dict[str, int]) -> float | None:
    """Mean recall over the classes with at least :data:`MIN_SUPPORT` cells (None without one): a class of a cell or
    two swings a balanced accuracy by 1/n_classes on its own (BCCD has 1 basophil)."""
    steady = [v for c, v in recall.items() if support.get(c, 0) >= MIN_SUPPORT]
    return round(float(np.mean(steady)), 4) if steady else None


def views_suffix(views: int) -> str:
    """The run-name suffix of a model scored over ``views`` rotations and reflections (none for 1)."""
    return f"+views{views}" if views > 1 else ""


def nucleated(label: str) -> bool:
    from smear.data.taxonomy import NRBC, SUBTYPES

    return label in SUBTYPES or label == NRBC or label == "WBC"


def summarise(rows: list[dict], classes: list[str]) -> dict:
    """Subtype balanced accuracy, accuracy and recall per class over nucleated cells; WBCs lost to RBC/platelets."""
    from smear.data.taxonomy import group_of

    nuc = [r for r in rows if nucleated(r["true"])]
    named = [r for r in nuc if r["true"] != "WBC" and r["true"] in classes]
    recall = {}
    for c in sorted({r["true"] for r in named}, key=classes.index):
        of = [r for r in named if r["true"] == c]
        recall[c] = round(sum(r["pred"] == c for r in of) / len(of), 4)
    lost = [r for r in nuc if group_of(r["pred"]) != "WBC"]
    out = {"nucleated_cells": len(nuc), "named_cells": len(named),
           "wbc_lost_to_group": round(len(lost) / len(nuc), 4) if nuc else None,
           "accuracy": round(sum(r["pred"] == r["true"] for r in named) / len(named), 4) if named else None,
           "balanced_accuracy": round(float(np.mean(list(recall.values()))), 4) if recall else None,
           "recall": recall, "support": {c: sum(r["true"] == c for r in named) for c in recall}}
    out[f"balanced_accuracy_support{MIN_SUPPORT}"] = balanced_accuracy_supported(recall, out["support"])
    out["group_accuracy"] = round(sum(group_of(r["pred"]) == group_of(r["true"]) for r in rows) / len(rows), 4) \
        if rows else None
    allc = [r for r in rows if r["true"] != "WBC"]
    out["all_classes_accuracy"] = round(sum(r["pred"] == r["true"] for r in allc) / len(allc), 4) if allc else None
    # PBC's 8 classes: every labelled cell but RBCs (the 7 nucleated classes and platelets)
    eight = [r for r in allc if r["true"] != "RBC"]
    out["accuracy_without_rbc"] = round(sum(r["pred"] == r["true"] for r in eight) / len(eight), 4) if eight else None
    return out


def score(model, rows, image_transform=None) -> list[dict]:
    from smear.classifier.evaluate import predict_rows

    probs = predict_rows(model, rows, image_transform=image_transform)
    out = []
    for r, p in zip(rows, probs):
        k = int(p.argmax())
        out.append({"source": r.source, "split": r.split, "image": Path(r.image).name, "true": r.label,
                    "pred": model.classes[k], "score": round(float(p[k]), 4)})
    return out


def write_cells(rows, model, folder: Path, image_transform=None) -> None:
    """The crops of ``rows`` as ``folder/<class>/*.png``, cut as the model cuts them (the input of adapt)."""
    import cv2

    from smear.data.crops import ImageCache, crop_cell

    cache = ImageCache(image_transform)
    for i, r in enumerate(rows):
        d = folder / r.label.lower()
        d.mkdir(parents=True, exist_ok=True)
        crop = crop_cell(cache.get(r.image), r.box, model.crop_margin, model.crop_size_px)
        cv2.imwrite(str(d / f"{i:05d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))


def unlabelled_cells(model, rows) -> list:
    """``(image, box)`` of ``rows`` as a lab's unlabelled cells (a subtype stage: the nucleated cells only, as the
    cascade hands it only likely WBCs; their classes are not used)."""
    from smear.data.crops import ImageCache

    if model.card.get("task") == "wbc-subtypes":
        rows = [r for r in rows if nucleated(r.label) and r.label != "WBC"]
    cache = ImageCache()
    return [(cache.get(r.image), r.box) for r in rows]


def adabn_model(model, rows, seed: int):
    """``model`` with its trained batch-norm statistics re-estimated on the crops of ``rows``."""
    import dataclasses

    from smear.classifier.adapt import recalibrate_batchnorm

    cells = unlabelled_cells(model, rows)
    net = recalibrate_batchnorm(model, cells, seed=seed)
    print(f"batch-norm statistics re-estimated on {len(cells)} crops")
    return dataclasses.replace(model, net=net)


def self_trained_model(model, rows, seed: int):
    """``model`` after the statistics and class-balanced self-training on the crops of ``rows`` (labels unused)."""
    import dataclasses

    from smear.classifier.adapt import AdaptConfig, self_train

    net, used = self_train(model, unlabelled_cells(model, rows), AdaptConfig(seed=seed))
    print(f"self-trained on {used['cells']} crops; pseudo-labels kept: {used['pseudo_labelled']}")
    return dataclasses.replace(model, net=net)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="classifier model folder (default: the shipped one)")
    ap.add_argument("--manifests", default=MANIFESTS, help="crop manifests, comma-separated")
    ap.add_argument("--sources", nargs="+", default=["bccd", "pbc", "raabin"])
    ap.add_argument("--split", default="val", choices=("train", "val", "test", "all", "val+test", "train+val"),
                    help="rows scored; 'all' for a lab the model never saw ('train+val' keeps BCCD's benchmark "
                         "test split for the shipped model's one score)")
    ap.add_argument("--adapt", nargs="*", type=int, default=[], help="also adapt on k cells per class (one run per k)")
    ap.add_argument("--adapt-from", default="train", help="split the adapt cells are drawn from (never scored)")
    ap.add_argument("--adapt-steps", type=int, default=150)
    ap.add_argument("--adapt-groups", action="store_true",
                    help="adapt on k RBCs and k platelets of the lab too (one adapted model for every call, as when "
                         "'smear review --export' gives rbc/ and platelets/ folders); default: WBC classes only")
    ap.add_argument("--adapt-seeds", type=int, default=1,
                    help="adapt this many times per k, each on another draw of cells (seeds --seed, --seed+1, ...); "
                         "the summary gives each run and the mean and SD over the draws")
    ap.add_argument("--stain-norm", metavar="LAB", nargs="+",
                    help="map each scored field onto the colours of the nearest of these labs (Reinhard in L*a*b*, "
                         "smear.detector.stain; the reference from their train fields), e.g. the labs the model "
                         "trained on, to measure stain normalisation before classification")
    ap.add_argument("--subtype-views", type=int, nargs="+", default=[0], metavar="N", choices=(0, *SUBTYPE_VIEWS),
                    help="score every model with each of these subtype_views (test-time augmentation of the subtype "
                         "call: 1, 2, 4 or 8 rotations and reflections; 0: the card's choice); a run with N > 1 is "
                         "named +viewsN")
    ap.add_argument("--adapt-bn-from", choices=("train", "val", "test"),
                    help="also score the model with its trained batch-norm layers' statistics re-estimated on this "
                         "split's cells of the source (no labels used but which crops are nucleated cells, for a "
                         "subtype stage; every crop for a model of all classes); never a scored split")
    ap.add_argument("--self-train", action="store_true",
                    help="with --adapt-bn-from: also self-train after the statistics on the same cells (their "
                         "classes unused) and score that model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", help="run name (default: the model folder's name)")
    ap.add_argument("--out", type=Path, default=results_csv("classifier_labs"))
    ap.add_argument("--write-card", metavar="KEY", help="store the per-source summaries in the model folder's card "
                    "under KEY (e.g. lolo_pbc_out)")
    args = ap.parse_args(argv)

    from smear.classifier.adapt import AdaptConfig, adapt
    from smear.classifier.config import ClassifierConfig
    from smear.classifier.model import load_classifier
    from smear.classifier.train import read_training_rows
    from smear.data.taxonomy import CELL_CLASSES

    model = load_classifier(args.weights)
    rows = read_training_rows(ClassifierConfig(manifest=args.manifests))
    want = {"all": ("train", "val", "test"), "val+test": ("val", "test"), "train+val": ("train", "val")}.get(
        args.split, (args.split,))
    if args.self_train and not args.adapt_bn_from:
        ap.error("--self-train needs --adapt-bn-from SPLIT (the unlabelled cells)")
    if args.adapt_bn_from in want:
        ap.error(f"--adapt-bn-from {args.adapt_bn_from} is among the scored splits ({args.split})")
    variant = args.variant or model_name(args.weights)
    transform = None
    if args.stain_norm:
        from smear.detector.stain import reference_from_fields

        reference = reference_from_fields(sorted({(r.source, r.image) for r in rows if r.source in args.stain_norm
                                                  and r.split == "train"}), every=8, tolerance=0.0)
        print("stain reference: " + ", ".join(f"{lab.name} ({lab.fields} fields)" for lab in reference.labs))
        transform = lambda image: reference.normalise(image)[0]  # noqa: E731
        variant = args.variant or f"{variant}+stain-norm"
    # one stamp for the whole run, taken before any row is written (the rows themselves dirty the checkout)
    start = run_stamp(variant, seed=args.seed, device="cpu")
    all_rows, summaries = [], {}
    for s in args.sources:
        scored_rows = [r for r in rows if r.source == s and r.split in want]
        if not scored_rows:
            continue
        runs = [(variant, model, [], args.seed, 0)]
        if args.adapt_bn_from:
            lab_rows = [r for r in rows if r.source == s and r.split == args.adapt_bn_from]
            runs.append((f"{variant}+adabn-{args.adapt_bn_from}", adabn_model(model, lab_rows, args.seed), [],
                         args.seed, 0))
            if args.self_train:
                runs.append((f"{variant}+selftrain-{args.adapt_bn_from}", self_trained_model(model, lab_rows, args.seed),
                             [], args.seed, 0))
        pool = [r for r in rows if r.source == s and r.split == args.adapt_from and r.label in model.classes
                and (nucleated(r.label) or (args.adapt_groups and r.label in ("RBC", "Platelets")))]
        for k in args.adapt:
            for seed in range(args.seed, args.seed + args.adapt_seeds):
                rng = random.Random(seed)
                chosen = [r for c in CELL_CLASSES for r in rng.sample([q for q in pool if q.label == c],
                                                                      min(k, sum(q.label == c for q in pool)))]
                with tempfile.TemporaryDirectory() as tmp:
                    write_cells(chosen, model, Path(tmp) / "cells", transform)
                    folder = adapt(Path(tmp) / "cells", Path(tmp) / "model", args.weights,
                                   AdaptConfig(steps=args.adapt_steps, seed=seed))
                    name = f"{variant}+adapt{k}" + ("+groups" if args.adapt_groups else "")
                    runs.append((name, load_classifier(folder), chosen, seed, k))
        # each model at each asked view count (0: its card's, read here before the loop below sets it)
        runs = [(name + views_suffix(v), m, chosen, seed, k, v) for name, m, chosen, seed, k in runs
                for v in dict.fromkeys(views or m.subtype_views for views in args.subtype_views)]
        for name, m, chosen, seed, k, views in runs:
            m.subtype_views = views
            stamp = {**start, "variant": name, "seed": seed}
            # the cells a model adapted on are never scored (when --adapt-from is among the scored splits)
            used = {(r.image, tuple(r.box)) for r in chosen}
            out = score(m, [r for r in scored_rows if (r.image, tuple(r.box)) not in used], transform)
            for r in out:
                r["adapt_cells"] = len(chosen)
            append_rows(args.out, out, stamp=stamp)
            all_rows += out
            sm = summarise(out, list(m.classes))
            key = f"{name}:{s}" + (f":seed{seed}" if args.adapt_seeds > 1 and k else "")
            summaries[key] = {"source": s, "split": args.split, "adapt_per_class": k, "adapt_cells": len(chosen), "seed": seed,
                              "subtype_views": views, **sm}
            rec = ", ".join(f"{c[:4]} {v:.2f}" for c, v in sm["recall"].items())
            print(f"{name:<34} {s:<7} {args.split:<8} seed {seed} nucleated {sm['nucleated_cells']:>5}  "
                  f"bal.acc {sm['balanced_accuracy']} (classes with >= {MIN_SUPPORT} cells "
                  f"{sm[f'balanced_accuracy_support{MIN_SUPPORT}']})  acc {sm['accuracy']}  lost to RBC/PLT "
                  f"{sm['wbc_lost_to_group']}  group acc {sm['group_accuracy']}  all-class acc {sm['all_classes_accuracy']}  acc w/o RBC "
                  f"{sm['accuracy_without_rbc']}  recall: {rec}")
        if args.adapt_seeds > 1:
            for k, views in itertools.product(args.adapt, dict.fromkeys(r[5] for r in runs)):
                of = [v for v in summaries.values() if v["source"] == s and v.get("adapt_per_class") == k
                      and "seed" in v and v["subtype_views"] == views]
                tag = f"{variant}+adapt{k}" + ("+groups" if args.adapt_groups else "") + views_suffix(views)
                bal = np.array([v["balanced_accuracy"] for v in of], float)
                steady = np.array([v[f"balanced_accuracy_support{MIN_SUPPORT}"] for v in of], float)
                lost = np.array([v["wbc_lost_to_group"] for v in of], float)
                summaries[f"{tag}:{s}:mean"] = {
                    "source": s, "adapt_per_class": k, "subtype_views": views, "draws": len(of), "balanced_accuracy_mean": round(bal.mean(), 4),
                    "balanced_accuracy_sd": round(bal.std(ddof=1), 4),
                    f"balanced_accuracy_support{MIN_SUPPORT}_mean": round(steady.mean(), 4),
                    "wbc_lost_to_group_mean": round(lost.mean(), 4)}
                print(f"{tag} {s}: balanced accuracy over {len(of)} draws {bal.mean():.4f} "
                      f"(SD {bal.std(ddof=1):.4f}; {', '.join(f'{b:.3f}' for b in bal)}), "
                      f"classes with >= {MIN_SUPPORT} cells {steady.mean():.4f}, WBCs lost to RBC/PLT {lost.mean():.4f}")
    print(f"{len(all_rows)} rows appended to {args.out}")
    if args.write_card:
        from smear.configs.modelcard import ModelCard

        folder = Path(model.folder)
        card = ModelCard.read(folder)
        card.set(args.write_card, {"command": "python " + " ".join(sys.argv), "date": start["date"][:10],
                                   "commit": start["commit"], "machine": start["machine"], "results": summaries})
        card.write(folder)
        print(f"card updated: {folder / 'card.json'} ({args.write_card})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
