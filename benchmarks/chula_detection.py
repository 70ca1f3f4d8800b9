"""Does the BCCD detector find Chula RBCs? Point coverage at several input scales.

For each held-out Chula RBC-12 test image (the split saved in the morphology model folder, or
recomputed from MorphologyConfig defaults) and each scale, the detector runs on the resized
field; a labelled cell counts as found when its point lies inside a detected RBC box. Chula
cells are about 35 px across and BCCD cells about 100 px, so scales near 3 should do best.

The detector letterboxes every image (or tile) to its imgsz, so an up-scaled field is tiled at
``--tile-px`` (default: the detector's imgsz) to keep the scale, with a quarter-tile overlap
(160 px, more than a cell at scale 4); with tiles larger than imgsz the network would shrink
the field back and a scale of 2 would behave like 1.

Appends a tidy table (one row per labelled cell and scale) to benchmarks/results/chula_detection.csv
(benchmarks/_results.py: date, commit, machine, device, variant, seed first; --variant defaults to the
detector's folder name, or ``shipped``) and prints the fraction found per scale (and per class).

RBC counting: Chula labels every cell in some fields only, so the RBC count is compared with the
number of points on the fields whose points reach 0.75 / 0.85 / 0.9 of a mask-based cell estimate
(foreground area over the median single-cell area; no detector involved), and with that estimate.
Chula's annotators leave most cells cut by the field border without a point (see --overlays), so
the error is also given on interior cells: RBC boxes clear of the border against the points that
no border box alone holds (a point inside no box stays in, as a missed cell).
RBCs cut by the field border are counted as the pipeline counts them (PipelineConfig.edge_fragment_min:
a fragment with less than half a typical cell inside belongs to the neighbouring field).

    python benchmarks/chula_detection.py [--weights runs/detector/RUN/weights/best.pt] \
        [--split val|test] [--scales 1 2 3 4] [--images 20] [--threads 1] [--overlays DIR]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _results import append_rows, model_name, results_csv, run_stamp

DENSE = (0.75, 0.85, 0.9)
BORDER_PX = 2  # a box edge this close to the field's edge marks a cell cut by the border


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="detector .pt or folder; default: the shipped detector")
    ap.add_argument("--morphology", default=None, help="morphology model folder whose split.json names the test images")
    ap.add_argument("--data-root", default=None, help="Chula RBC-12 folder (default: MorphologyConfig.data_root)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="Chula images to score (val for choices, test to report)")
    ap.add_argument("--images", type=int, default=0, help="first N test images only (0: all)")
    ap.add_argument("--conf", type=float, default=None, help="detector score threshold (default: the pipeline's)")
    ap.add_argument("--tile-px", type=int, default=0, help="tile side at inference (0: the detector's imgsz)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--edge-fragment-min", type=float, default=None,
                    help="RBCs cut by the field border count only with this fraction of a typical diameter inside "
                         "(default: the pipeline's, PipelineConfig.edge_fragment_min; 0 counts every fragment)")
    ap.add_argument("--output", default=str(results_csv("chula_detection")), help="table the rows are appended to")
    ap.add_argument("--variant", default=None,
                    help="name of this run in the table (default: the detector folder's name, or 'shipped')")
    ap.add_argument("--overlays", default=None,
                    help="folder for a PNG per densely labelled field (points >= 0.75 x estimate) and scale: RBC "
                         "boxes holding a point in green, holding none in red, points outside every box as yellow "
                         "crosses; for auditing what the count error is made of")
    args = ap.parse_args()
    stamp = run_stamp(args.variant or model_name(args.weights))

    import json

    from smear.classifier.config import MorphologyConfig
    from smear.classifier.model import resolve_morphology_folder
    from smear.configs.paths import resolve_path
    from smear.data.chula import read_chula, split_images
    from smear.data.images import read_image
    from smear.data.pointlabels import estimate_cell_count, points_in_boxes
    from smear.data.taxonomy import GROUPS
    from smear.detector.config import DetectorConfig
    from smear.detector.model import find_detector
    from smear.detector.predict import Detector, at_border, drop_edge_fragments
    from smear.pipeline.config import PipelineConfig

    mcfg = MorphologyConfig()
    data = read_chula(resolve_path(args.data_root or mcfg.data_root))
    try:
        folder = resolve_morphology_folder(args.morphology)
        test_ids = json.loads((folder / "split.json").read_text())[args.split]
        split_source = str(folder / "split.json")
    except Exception:  # noqa: BLE001  no model folder yet: the same rule from the config defaults
        test_ids = split_images(data, mcfg.val_fraction, mcfg.test_fraction, mcfg.split_seed)[args.split]
        split_source = "MorphologyConfig defaults"
    test_ids = [i for i in test_ids if i in data][: args.images or None]

    info = find_detector(args.weights)
    pipeline = PipelineConfig().for_detector(info.card)  # the operating point the pipeline counts with
    conf = pipeline.thresholds() if args.conf is None else args.conf  # per class, as smear analyze
    rbc_conf = conf["RBC"] if isinstance(conf, dict) else conf
    edge_min = pipeline.edge_fragment_min if args.edge_fragment_min is None else args.edge_fragment_min
    tile = args.tile_px or info.imgsz
    det = Detector(args.weights, cfg=DetectorConfig(imgsz=info.imgsz, tile_px=tile, tile_overlap_px=tile // 4),
                   threads=args.threads)  # the Detector sets torch's thread count
    rbc = GROUPS.index("RBC")
    rows = []
    t0 = time.time()
    for image_id in test_ids:
        cells = data[image_id]
        img = read_image(cells[0].image)
        estimate = round(estimate_cell_count(np.ascontiguousarray(img[..., ::-1])), 1)
        for s in args.scales:
            d = drop_edge_fragments(det.predict([img], conf=conf, scale=s)[0], (img.shape[1], img.shape[0]),
                                    edge_min)
            boxes = d.boxes[d.classes == rbc]
            diam = float(np.median((boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2)) if len(boxes) else ""
            points = [(c.x, c.y) for c in cells]
            inside_box = points_in_boxes(points, boxes)
            found = inside_box.any(0)
            # Interior count: RBC boxes clear of the field border against the points not held by a border
            # box alone (a point in no box stays: a missed cell). Chula leaves most border-cut cells unlabelled.
            # measured from the last pixel row/column (size - 1), as the published interior figures were
            at_x, at_y = at_border(boxes, (img.shape[1] - 1, img.shape[0] - 1), BORDER_PX)
            clear = ~at_x & ~at_y
            interior_points = int((inside_box[clear].any(0) | ~found).sum())
            if args.overlays and len(cells) >= DENSE[0] * estimate:
                draw_overlay(Path(args.overlays) / f"chula_{image_id}_scale{s:g}.png", img, boxes,
                             inside_box.any(1), points, found)
            for c, inside in zip(cells, found):
                rows.append({"split": args.split, "image_id": image_id, "scale": s, "x": c.x, "y": c.y,
                             "label": c.label, "found": int(inside), "rbc_boxes": len(boxes),
                             "labelled_cells": len(cells), "cells_estimate": estimate,
                             "rbc_boxes_interior": int(clear.sum()), "labelled_cells_interior": interior_points,
                             "median_rbc_box_px": round(diam, 1) if diam != "" else ""})
    out = append_rows(args.output, rows, stamp=stamp)

    # Summaries from the table only.
    print(f"detector {det.info.weights} (imgsz {det.imgsz}, tile {tile} px, conf {rbc_conf} for RBCs); "
          f"edge fragments < {edge_min:g} of a cell dropped; "
          f"{len(test_ids)} Chula {args.split} images ({split_source}), {sum(len(data[i]) for i in test_ids)} labelled cells; "
          f"{time.time() - t0:.0f} s")
    print("scale  found   RBC boxes / labelled cells   median RBC box (px, in the original field)")
    for s in args.scales:
        r = [x for x in rows if x["scale"] == s]
        per_image = {x["image_id"]: x for x in r}
        boxes = sum(x["rbc_boxes"] for x in per_image.values())
        labelled = sum(x["labelled_cells"] for x in per_image.values())
        diams = [x["median_rbc_box_px"] for x in per_image.values() if x["median_rbc_box_px"] != ""]
        print(f"{s:5g}  {np.mean([x['found'] for x in r]):.3f}   {boxes / labelled:.2f}"
              f"                         {np.median(diams) if diams else float('nan'):.1f}")
    # RBC counting can be judged only where (nearly) every cell carries a point: fields whose
    # labelled points reach a share of the mask-based cell estimate (independent of the detector).
    print("count error on densely labelled fields: mean |RBC boxes - points| / points (signed), by how densely "
          "labelled (points / mask estimate of cells); last column: |RBC boxes - mask estimate| / estimate")
    for s in args.scales:
        per_image = {x["image_id"]: x for x in rows if x["scale"] == s}
        for share in DENSE:
            dense = [x for x in per_image.values() if x["labelled_cells"] >= share * x["cells_estimate"]]
            if not dense:
                print(f"  scale {s:g}, points >= {share:g} x estimate: no field")
                continue
            err = [abs(x["rbc_boxes"] - x["labelled_cells"]) / x["labelled_cells"] for x in dense]
            signed = [(x["rbc_boxes"] - x["labelled_cells"]) / x["labelled_cells"] for x in dense]
            vs_mask = [abs(x["rbc_boxes"] - x["cells_estimate"]) / x["cells_estimate"] for x in dense if x["cells_estimate"]]
            inner = [(x["rbc_boxes_interior"] - x["labelled_cells_interior"]) / x["labelled_cells_interior"]
                     for x in dense if x["labelled_cells_interior"]]
            print(f"  scale {s:g}, points >= {share:g} x estimate: {len(dense)} of {len(per_image)} fields; "
                  f"error {np.mean(err):.3f} ({np.mean(signed):+.3f}); vs mask estimate {np.mean(vs_mask):.3f}; "
                  f"interior cells only {np.mean(np.abs(inner)):.3f} ({np.mean(inner):+.3f})")
    by_class: dict[tuple[float, str], list[int]] = defaultdict(list)
    for x in rows:
        by_class[(x["scale"], x["label"])].append(x["found"])
    labels = sorted({x["label"] for x in rows})
    print("found per class: " + "  ".join(f"{lab}" for lab in labels))
    for s in args.scales:
        print(f"  scale {s:g}: " + "  ".join(f"{np.mean(by_class[(s, lab)]):.2f}" for lab in labels))
    print(f"table: {out}")


def draw_overlay(path: Path, bgr: np.ndarray, boxes: np.ndarray, has_point: np.ndarray,
                 points: list[tuple[float, float]], found: np.ndarray) -> None:
    """Write the field with its RBC boxes (green: holds a labelled point, red: holds none) and the
    points (blue dots; yellow crosses where no box holds them), with the tallies in the corner."""
    import cv2

    img = np.ascontiguousarray(bgr.copy())
    for (x1, y1, x2, y2), ok in zip(boxes.astype(int), has_point):
        cv2.rectangle(img, (x1, y1), (x2, y2), (0, 200, 0) if ok else (0, 0, 255), 1)
    for (x, y), ok in zip(points, found):
        if ok:
            cv2.circle(img, (int(x), int(y)), 2, (255, 0, 0), -1)
        else:
            cv2.drawMarker(img, (int(x), int(y)), (0, 255, 255), cv2.MARKER_CROSS, 8, 2)
    text = (f"boxes {len(boxes)}  without point {int((~has_point).sum())}  "
            f"points {len(points)}  missed {int((~found).sum())}")
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3)
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


if __name__ == "__main__":
    main()
