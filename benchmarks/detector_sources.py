"""Detector per source lab: mAP50 and count error on each source's completely labelled fields.

Reads the fields of ``smear.data.complete`` (BCCD fields labelled completely by bccd-relabel, the PBC
and Raabin fields of txl-external), runs the detector on each ORIGINAL image as ``smear analyze`` does
(``scale=auto`` by default: the detector measures the RBC size and resizes to its training scale) at the
card's operating thresholds, and compares the counts per field with the labels: every box (the labels box the
slivers of RBCs cut by the field border too), and RBCs as ``smear analyze`` counts them (a border fragment with
less than ``edge_fragment_min`` of a typical RBC inside is left to the neighbouring field), the same rule applied
to the labels. mAP50 comes from
ultralytics' validator on the prepared set (every source already at the training scale), one source at a
time. One row per field goes to ``benchmarks/results/detector_sources.csv``; the summary per source is
printed and is computed from those rows.

Leave-one-source-out: pass a model trained without a source (``--exclude`` when building its set) and
read that source's row; figures on a source the model trained on are not generalisation figures.

Example:
    python benchmarks/detector_sources.py --weights detector/models/complete-yolov8n-cpu --split val
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, model_name, results_csv, run_stamp  # noqa: E402

GROUPS = ("RBC", "WBC", "Platelets")


def _normalised_copies(listed: list[str], root: Path, out: Path, stain) -> list[str]:
    """The fields as the detector sees them with its stain reference: PNG copies beside a link to the labels."""
    import cv2

    from smear.data.images import read_image

    out.mkdir(parents=True, exist_ok=True)
    (out / "labels").unlink(missing_ok=True)
    (out / "labels").symlink_to((root / "labels").resolve(), target_is_directory=True)
    copies = []
    for path in listed:
        p = Path(path)
        target = out / "images" / p.parent.name / f"{p.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image, _ = stain.normalise(read_image(p))
        cv2.imwrite(str(target), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        copies.append(str(target))
    return copies


def map50_per_source(weights, data_yaml: Path, split: str, sources: list[str], out: Path,
                     stain=None) -> dict[str, dict]:
    """mAP50 (and per-group AP50) per source, from ultralytics' validator on a per-source file list; with a
    ``stain`` reference the validator sees the fields as ``Detector.predict`` does (normalised copies)."""
    import csv

    import yaml
    from ultralytics import YOLO

    from smear.detector.model import find_detector

    info = find_detector(weights)
    root = data_yaml.parent
    out.mkdir(parents=True, exist_ok=True)
    with open(root / "fields.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if split in ("all", r["split"])]
    res = {}
    model = YOLO(str(info.weights), task="detect")
    for s in sources:
        listed = [str(root / "images" / r["split"] / f"{r['image']}.jpg") for r in rows if r["source"] == s]
        if not listed:
            continue
        if stain is not None:
            listed = _normalised_copies(listed, root, out / "stain-normalised", stain)
        (out / f"{s}.txt").write_text("\n".join(listed) + "\n")
        y = out / f"{s}.yaml"
        y.write_text(yaml.safe_dump({"path": str(root), "train": str(out / f"{s}.txt"), "val": str(out / f"{s}.txt"),
                                     "names": dict(enumerate(GROUPS))}))
        m = model.val(data=str(y), split="val", imgsz=info.imgsz, batch=8, conf=0.001, iou=0.7, device="cpu",
                      plots=False, project=str(out), name=s, exist_ok=True, verbose=False)
        res[s] = {"mAP50": round(float(m.box.map50), 4),
                  **{f"AP50_{GROUPS[int(c)]}": round(float(m.box.ap50[i]), 4) for i, c in enumerate(m.box.ap_class_index)}}
    return res


def count_error(rows: list[dict], true_key: str, pred_key: str) -> tuple[dict, str]:
    """Count error of ``rows`` (one per field): the summary (true total, MAE, relative error, bias) and its text."""
    t = np.array([r[true_key] for r in rows], float)
    p = np.array([r[pred_key] for r in rows], float)
    mae, rel, bias = np.abs(p - t).mean(), np.abs(p - t).sum() / max(t.sum(), 1), (p - t).sum() / max(t.sum(), 1)
    return ({"true": int(t.sum()), "mae": round(float(mae), 3), "relative_error": round(float(rel), 4),
             "bias": round(float(bias), 4)}, f"MAE {mae:.2f} rel {100 * rel:.1f}% bias {100 * bias:+.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="detector model folder (default: the shipped one)")
    ap.add_argument("--data", default="runs/prepared/complete/yolo/data.yaml",
                    help="set written by smear.data.complete (for mAP50; fields.csv names each field's source)")
    ap.add_argument("--shared", default="../shared/data", help="the shared data folder")
    ap.add_argument("--split", default="val", choices=("train", "val", "all"),
                    help="fields of this split; 'all' for a source the model never saw (leave-one-source-out)")
    ap.add_argument("--sources", nargs="+", default=["bccd", "pbc", "raabin"])
    ap.add_argument("--scale", default="auto", help="'auto', or a resize factor for every field")
    ap.add_argument("--auto-scale-tolerance", type=float, default=None,
                    help="with --scale auto, detect a field again at the training RBC size unless its RBCs are within "
                         "this factor of it (default: the pipeline's, smear.detector.predict.AUTO_SCALE_TOLERANCE)")
    ap.add_argument("--no-map", action="store_true", help="counts only (skip the mAP50 pass)")
    ap.add_argument("--edge-fragment-min", type=float, default=None,
                    help="for the RBC count as smear reports it: RBCs cut by the field border count only with this "
                         "fraction of a typical RBC inside, in the labels and the detections alike (default: the "
                         "pipeline's, PipelineConfig.edge_fragment_min)")
    ap.add_argument("--stain-norm", action="store_true",
                    help="map fields unlike the card's training labs onto the nearest lab's colours first "
                         "(as --set stain_norm=true does in smear analyze)")
    ap.add_argument("--adapt-from", choices=("train", "val"),
                    help="first re-estimate the model's batch-norm statistics on these fields of --sources (their "
                         "labels unused: smear.detector.adapt, which failed its rule, docs/models.md), then score the "
                         "adapted model on --split")
    ap.add_argument("--rbc-rescue", action="store_true",
                    help="keep RBC boxes under the threshold that fill red-cell pixels no kept box covers, as "
                         "smear analyze with rbc_rescue does (counts only: mAP50 ranks every box anyway)")
    ap.add_argument("--variant", help="run name (default: the model folder's name)")
    ap.add_argument("--out", type=Path, default=results_csv("detector_sources"))
    ap.add_argument("--write-card", action="store_true",
                    help="store the per-source summary in the model folder's card as sources_<split>")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from smear.configs.paths import resolve_path
    from smear.data.complete import list_fields
    from smear.data.images import read_image
    from smear.detector.predict import Detections, Detector, drop_edge_fragments
    from smear.pipeline.config import PipelineConfig

    if args.auto_scale_tolerance is not None:
        import smear.detector.predict as predict

        predict.AUTO_SCALE_TOLERANCE = args.auto_scale_tolerance
    if args.adapt_from:
        if args.adapt_from == args.split or args.split == "all":
            ap.error(f"--adapt-from {args.adapt_from} with --split {args.split}: adapt on fields the score never sees")
        from smear.detector.adapt import recalibrate_batchnorm

        name = f"{args.variant or model_name(args.weights)}-adabn-{args.adapt_from}"
        adapt_on = [f.image for f in list_fields(resolve_path(args.shared)) if f.split == args.adapt_from
                    and f.source in args.sources]
        args.weights = str(recalibrate_batchnorm(args.weights, (read_image(p) for p in adapt_on),
                                                 resolve_path("runs/detector_sources") / name,
                                                 scale=args.scale if args.scale == "auto" else float(args.scale),
                                                 source=f"{'+'.join(args.sources)} {args.adapt_from} fields"))
        args.variant = name
    det = Detector(args.weights, stain_norm=args.stain_norm)
    pipeline = PipelineConfig()
    thresholds = pipeline.thresholds(det.info.card)
    edge_min = pipeline.edge_fragment_min if args.edge_fragment_min is None else args.edge_fragment_min

    def counted_rbcs(d, image) -> int:
        """RBCs as smear analyze counts them: border fragments below ``edge_min`` of a typical RBC left out."""
        kept = drop_edge_fragments(d, (image.shape[1], image.shape[0]), edge_min)
        return int((kept.classes == GROUPS.index("RBC")).sum())
    scale = args.scale if args.scale == "auto" else float(args.scale)
    if args.rbc_rescue:
        from smear.detector.coverage import detect_with_rescued_rbcs

        args.variant = f"{args.variant or model_name(args.weights)}+rbc-rescue"

    def detect(image):
        """The field's detections at the operating thresholds (and, with --rbc-rescue, the RBCs it keeps under)."""
        if not args.rbc_rescue:
            return det.predict([image], conf=thresholds, scale=scale)[0]
        return detect_with_rescued_rbcs(det, image, thresholds, scale)
    stamp = run_stamp(args.variant or model_name(args.weights), device="cpu")
    fields = [f for f in list_fields(resolve_path(args.shared)) if args.split in ("all", f.split)
              and f.source in args.sources]
    rows, summary = [], {}
    for f in fields:
        image = read_image(f.image)
        found = detect(image)
        labelled = Detections(np.array([b[1:] for b in f.boxes], np.float32).reshape(-1, 4),
                              np.ones(len(f.boxes), np.float32),
                              np.array([GROUPS.index(b[0]) for b in f.boxes], np.int64))
        row = {"split": f.split, "source": f.source, "image": f.image.name, "scale": round(found.scale, 4),
               "stain_mapped_to": found.stain_mapped_to or "",
               "rbc_diameter_px": found.rbc_diameter_px or "", "thresholds": ";".join(f"{g}={t:g}" for g, t in
                                                                                     thresholds.items())}
        for gi, g in enumerate(GROUPS):
            row[f"true_{g}"] = sum(b[0] == g for b in f.boxes)
            row[f"pred_{g}"] = int((found.classes == gi).sum())
        row["edge_fragment_min"] = edge_min
        row["counted_true_RBC"], row["counted_pred_RBC"] = counted_rbcs(labelled, image), counted_rbcs(found, image)
        rows.append(row)
    aps = {} if args.no_map else map50_per_source(args.weights, resolve_path(args.data), args.split, args.sources,
                                                  resolve_path("runs/detector_sources") / stamp["variant"], det.stain)
    for s in args.sources:
        of = [r for r in rows if r["source"] == s]
        if not of:
            continue
        for r in of:
            r.update({k: v for k, v in aps.get(s, {}).items()})
        line = [f"{s:<7} {len(of):>4} fields"]
        if det.stain is not None:
            line.append(f"{sum(bool(r['stain_mapped_to']) for r in of)} stain-mapped")
        summary[s] = {"fields": len(of), **aps.get(s, {})}
        if s in aps:
            line.append(f"mAP50 {aps[s]['mAP50']:.3f}")
        for g in GROUPS:
            summary[s][f"count_{g}"], text = count_error(of, f"true_{g}", f"pred_{g}")
            line.append(f"{g} {text}")
        counted, text = count_error(of, "counted_true_RBC", "counted_pred_RBC")
        summary[s]["count_RBC_as_counted"] = {"edge_fragment_min": edge_min, **counted}
        line.append(f"RBC as counted (border fragments < {edge_min:g} cell out, labels too) {text}")
        print(" | ".join(line))
    out = append_rows(args.out, rows, stamp=stamp)
    print(f"{len(rows)} rows appended to {out}")
    if args.write_card:
        from smear.configs.modelcard import ModelCard

        folder = det.info.weights.parent
        card = ModelCard.read(folder)
        card.set(f"sources_{args.split}", {
            "command": "python " + " ".join(sys.argv), "date": stamp["date"][:10], "commit": stamp["commit"],
            "labels": "complete: bccd-relabel (BCCD fields), txl-external (PBC, Raabin)",
            "thresholds": rows[0]["thresholds"] if rows else "", "scale": args.scale, **summary})
        card.write(folder)
        print(f"card updated: {folder / 'card.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
