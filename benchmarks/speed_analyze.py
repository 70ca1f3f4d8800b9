"""Issue 5 speed targets, on this machine: smear analyze vs the detector alone vs the study's approach.

Prints, for the BCCD test images (72):
- end-to-end images/s of the full pipeline (read, detect, classify, merge, flags), outputs not written;
- the same images through ultralytics predict alone (detector only), and the ratio of the two;
- the study's approach: the same detector plus every crop classified by ResNet50 at 224 px (same
  head, random weights: speed does not depend on the weights), and how many times slower it is.
Appends one row per timed pass to benchmarks/results/speed_analyze.csv (benchmarks/_results.py:
date, commit, machine, device, variant, seed, then the run's columns); --variant names the run
(default: what differs from the plain run -- gpu, onnx, threadsN, torch -- or ``default``; the plain run is
the default runtime, onnx, since issue 23: rows before it ran torch).

    python benchmarks/speed_analyze.py [--images N] [--threads 2]
    python benchmarks/speed_analyze.py --detector-weights runs/export/bccd-chula-yolov8n-cpu-onnx \
        --no-study   # after 'smear detector export': variant onnx
    python benchmarks/speed_analyze.py --device cuda --threads 16 --no-study [--no-pad]   # variant gpu

Also timed, once each: the first pass (model load excluded; on a GPU it includes the one-time
kernel set-up for each new input shape) and, after it, a pass over as many val fields (new
fields, so new crop counts per batch).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _results import append_rows, results_csv, run_stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--images", type=int, default=72)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes (the best is kept)")
    ap.add_argument("--detector-weights", default="", help="detector .pt, .onnx or model folder (default: shipped)")
    ap.add_argument("--no-study", action="store_true", help="skip the slow ResNet50 comparison")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0")
    ap.add_argument("--runtime", default="onnx", choices=("onnx", "torch"), help="PipelineConfig.runtime")
    ap.add_argument("--no-pad", action="store_true", help="for comparison: classify each batch at its own size "
                    "(no padding to a few shapes on a GPU)")
    ap.add_argument("--out", type=Path, default=results_csv("speed_analyze"), help="table the rows are appended to")
    ap.add_argument("--variant", default=None, help="name of this run in the table (default: gpu, onnx, threadsN "
                    "joined by '-' for what differs from the plain run, else 'default')")
    args = ap.parse_args()

    import torch  # the Analyzer's Detector sets torch's thread count from PipelineConfig.threads

    from smear.classifier.model import CellClassifier
    from smear.classifier.predict import crops_from_boxes, to_tensor
    from smear.configs.paths import resolve_path
    from smear.data.images import read_image
    from smear.pipeline.analyze import Analyzer
    from smear.pipeline.config import PipelineConfig

    root = resolve_path(args.data)
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[: args.images]
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    new_ids = (root / "ImageSets" / "Main" / "val.txt").read_text().split()[: args.images]
    new_paths = [root / "JPEGImages" / f"{i}.jpg" for i in new_ids]
    if args.no_pad:
        import smear.classifier.predict as classify

        classify.padded_size = lambda n, batch: n
    analyzer = Analyzer(PipelineConfig(threads=args.threads, detector_weights=args.detector_weights,
                                       device=args.device, runtime=args.runtime))
    imgsz = analyzer.detector.imgsz
    onnx = bool(args.detector_weights) and analyzer.detector.runtime == "onnx"  # an exported folder given by name
    named = ["gpu" if args.device != "cpu" else "", "onnx" if onnx else "",
             f"threads{args.threads}" if args.device == "cpu" and args.threads != 2 else "",
             "torch" if args.runtime == "torch" and args.device == "cpu" else ""]
    stamp = run_stamp(args.variant or "-".join(n for n in named if n) or "default", device=args.device)
    import cv2

    def run_pipeline(fields: list = paths) -> int:
        return sum(len(r.cells) for r in analyzer.analyze_images(fields))

    def run_detector_alone() -> int:
        n = 0
        for k in range(0, len(paths), analyzer.cfg.batch):
            ims = [cv2.imread(str(p)) for p in paths[k:k + analyzer.cfg.batch]]
            for d in analyzer.detector._run(ims, min(analyzer.cfg.thresholds().values()), analyzer.cfg.iou):
                n += len(d)
        return n

    resnet = CellClassifier("resnet50", 7, 128, 0.5, "none").eval()
    study_model = type(analyzer.classifier)(resnet, analyzer.classifier.classes, 224, analyzer.classifier.crop_margin)

    @torch.inference_mode()
    def run_study() -> int:
        n = 0
        for p in paths:
            img = read_image(p)
            det = analyzer.detector.predict([img])[0]
            crops = crops_from_boxes(study_model, img, det.boxes)
            for k in range(0, len(crops), 32):
                resnet(to_tensor(crops[k:k + 32]))
            n += len(crops)
        return n

    rows = []

    def timed(name: str, fn, n_images: int, rep: int = 0) -> float:
        t0 = time.perf_counter()
        cells = fn()
        dt = time.perf_counter() - t0
        rows.append({"run": name, "repeat": rep, "images": n_images, "cells": cells, "seconds": round(dt, 3),
                     "images_per_s": round(n_images / dt, 3), "threads": args.threads,
                     "detector": analyzer.detector.info.weights.suffix.lstrip("."),
                     "pad": not args.no_pad and args.device != "cpu"})
        return dt

    # warm-up (first-call allocations, kernel set-up), then as many new fields
    first = timed("smear_analyze_first_pass", run_pipeline, len(paths))
    new = timed("smear_analyze_new_fields", lambda: run_pipeline(new_paths), len(new_paths))
    runs = [("detector_alone", run_detector_alone), ("smear_analyze", run_pipeline)]
    for name, fn in runs + ([] if args.no_study else [("study_resnet50_224", run_study)]):
        for rep in range(args.repeats if name != "study_resnet50_224" else 1):
            timed(name, fn, len(paths), rep)
    out = append_rows(args.out, rows, stamp=stamp)
    best = {n: min(r["seconds"] for r in rows if r["run"] == n) for n in {r["run"] for r in rows}}
    n = len(paths)
    print(f"device: {args.device}{' (no padding)' if args.no_pad else ''}, first pass {first:.2f} s, then "
          f"{len(new_paths)} new fields {new:.2f} s")
    print(f"images: {n}, threads: {args.threads}, classifier: {analyzer.classifier.card['config']['backbone']} "
          f"@ {analyzer.classifier.crop_size_px} px, detector {analyzer.detector.info.weights} imgsz {imgsz}")
    print(f"detector alone ({analyzer.detector.runtime}):       {best['detector_alone']:.2f} s  ({n / best['detector_alone']:.2f} img/s)")
    print(f"smear analyze, end to end:           {best['smear_analyze']:.2f} s  ({n / best['smear_analyze']:.2f} img/s)"
          f"  -> {best['smear_analyze'] / best['detector_alone']:.2f}x the detector alone (target <= 1.3x, >= 4 img/s)")
    if "study_resnet50_224" in best:
        print(f"study approach (ResNet50 @ 224 px):  {best['study_resnet50_224']:.2f} s  "
              f"({n / best['study_resnet50_224']:.2f} img/s) -> smear is "
              f"{best['study_resnet50_224'] / best['smear_analyze']:.1f}x faster (target >= 5x)")
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
