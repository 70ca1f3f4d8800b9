"""Inference cost per crop of each backbone x crop size, on this machine's CPU.

Weights do not change the cost, so untrained networks with the study's head are timed
(batch of 256 crops, channels-last, best of 3). Includes the study's ResNet50 at 224 px.
Rows are appended to benchmarks/results/classifier_speed.csv (benchmarks/_results.py: date, commit,
machine, device, variant, seed, then the run's columns), variant ``backbone-grid`` by default.

    python benchmarks/classifier_speed.py [--threads 2]
    python benchmarks/classifier_speed.py --cascade   # the shipped cascade on real detections

``--cascade`` times the shipped classifier cascade (every crop at the primary's size, possible
WBCs through the refiner, likely WBCs through the subtype stage) on the detector's boxes of the
BCCD test fields, in the pipeline's chunks of 32 crops, and prints the mean cost per crop and
how many crops each stage saw (``--subtype-views N``: each likely WBC's subtype call over N views,
counted N times): one row in the same table, variant ``cascade`` by default (``cascade-<folder>``
with --weights).
"""

from __future__ import annotations

import argparse
import time

from _results import append_rows, model_name, results_csv

from smear.classifier.config import SUBTYPE_VIEWS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cascade", action="store_true", help="time the shipped cascade on real detections")
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--weights", default=None, help="with --cascade: classifier folder to time (default: shipped)")
    ap.add_argument("--subtype-views", type=int, default=0, choices=(0, *SUBTYPE_VIEWS), help="with --cascade: test-time augmentation of the "
                    "subtype call (1, 2, 4 or 8 views; 0: the card's choice); variant +viewsN when N > 1")
    ap.add_argument("--variant", default=None, help="name of this run in the table (default: backbone-grid; "
                    "cascade, or cascade-<weights folder name>, with --cascade)")
    args = ap.parse_args()

    import torch

    if args.cascade:
        torch.set_num_threads(args.threads)
        return time_cascade(args)

    from smear.classifier.model import CellClassifier

    torch.set_num_threads(args.threads)
    grid = [("mobilenet_v2", 48), ("mobilenet_v2", 64), ("mobilenet_v2", 96), ("mobilenet_v2", 128),
            ("efficientnet_lite0", 64), ("efficientnet_lite0", 96), ("efficientnet_lite0", 128),
            ("resnet50", 96), ("resnet50", 224)]
    rows = []
    for backbone, size in grid:
        net = CellClassifier(backbone, 7, 128, 0.5, "none").eval().to(memory_format=torch.channels_last)
        n = args.batch if size <= 128 else 64
        x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net(x[:8])
            best = min(_timed(net, x) for _ in range(3))
        rows.append({"backbone": backbone, "crop_size_px": size, "ms_per_crop": round(1000 * best / n, 3),
                     "threads": args.threads, "batch": n})
        print(f"{backbone:<20} {size:>4} px  {1000 * best / n:7.2f} ms/crop")
    out = append_rows(results_csv("classifier_speed"), rows, variant=args.variant or "backbone-grid")
    print(f"rows: {out}")


def time_cascade(args) -> None:
    """Mean cost per crop of the shipped cascade on the detector's boxes of the BCCD test fields."""
    from smear.classifier import predict
    from smear.classifier.model import load_classifier
    from smear.configs.paths import resolve_path
    from smear.data.images import read_image
    from smear.detector.predict import Detector
    from smear.pipeline.analyze import CLASSIFIER_BATCH

    root = resolve_path(args.data)
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()
    images = [read_image(root / "JPEGImages" / f"{i}.jpg") for i in ids]
    # the Detector holds args.threads through ultralytics' device pick (which alone leaves cores - 1)
    boxes = [d.boxes for d in Detector(threads=args.threads).predict(images)]
    model = load_classifier(args.weights)
    model.subtype_views = args.subtype_views or model.subtype_views
    seen: dict[str, int] = {}
    real = predict.predict_crops

    def counting(m, crops, batch=256):
        role = "subtyper" if m is model.subtyper else "refiner" if m is model.refiner else "primary"
        seen[role] = seen.get(role, 0) + len(crops)
        return real(m, crops, batch)

    predict.classify_fields(model, images[:8], boxes[:8], batch=CLASSIFIER_BATCH)  # warm-up
    best = float("inf")
    for _ in range(3):
        seen.clear()
        predict.predict_crops = counting
        t0 = time.perf_counter()
        for k in range(0, len(images), 8):
            predict.classify_fields(model, images[k:k + 8], boxes[k:k + 8], batch=CLASSIFIER_BATCH)
        best = min(best, time.perf_counter() - t0)
        predict.predict_crops = real
    n = sum(len(b) for b in boxes)
    row = {"weights": args.weights or "shipped", "images": len(images), "crops": n, "seconds": round(best, 3),
           "ms_per_crop": round(1000 * best / n, 3),
           "primary_crops": seen.get("primary", 0), "refiner_crops": seen.get("refiner", 0),
           "subtyper_crops": seen.get("subtyper", 0), "subtype_views": model.subtype_views, "threads": args.threads}
    variant = args.variant or (("cascade" if not args.weights else f"cascade-{model_name(args.weights)}")
                               + (f"+views{model.subtype_views}" if model.subtype_views > 1 else ""))
    out = append_rows(results_csv("classifier_speed"), [row], variant=variant)
    print(f"cascade on {n} detected crops of {len(images)} test fields: {row['ms_per_crop']:.2f} ms/crop "
          f"(crop cutting included); crops seen: primary {row['primary_crops']}, refiner {row['refiner_crops']}, "
          f"subtype stage {row['subtyper_crops']}")
    print(f"rows: {out}")


def _timed(net, x) -> float:
    t0 = time.perf_counter()
    net(x)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
