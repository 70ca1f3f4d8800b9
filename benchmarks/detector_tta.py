"""Does test-time augmentation help the detector? ultralytics' ``augment=True`` (flips and two smaller
scales, merged) against plain inference, on a split of the prepared BCCD set (val by default: choices
are made on val, never test). Prints mAP50, mAP50-95, per-class AP50 and seconds for each, and appends
them (one row per setting) to benchmarks/results/detector_tta.csv (benchmarks/_results.py: date, commit,
machine, device, variant, seed first; --variant defaults to the detector folder's name, or ``shipped``).

    python benchmarks/detector_tta.py [--weights FOLDER_OR_PT] [--split val]
"""

from __future__ import annotations

import argparse
import time

from _results import append_rows, model_name, results_csv

from smear.configs.offline import ensure_offline
from smear.configs.paths import resolve_path
from smear.detector.config import DetectorConfig
from smear.detector.model import find_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="detector .pt or model folder (default: shipped)")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--data", default=None, help="YOLO data.yaml (default: configs' prepared BCCD)")
    ap.add_argument("--variant", default=None,
                    help="name of this run in the table (default: the detector folder's name, or 'shipped')")
    args = ap.parse_args()
    ensure_offline()
    from ultralytics import YOLO

    info = find_detector(args.weights)
    data = args.data or str(resolve_path(DetectorConfig().data))
    model = YOLO(str(info.weights), task="detect")
    print(f"detector {info.weights}, {args.split} split of {data}")
    rows = []
    for augment in (False, True):
        t0 = time.perf_counter()
        r = model.val(data=data, split=args.split, imgsz=info.imgsz, batch=8, conf=0.001, iou=0.7, device="cpu",
                      plots=False, verbose=False, augment=augment, project=str(resolve_path("runs/tta")),
                      name=f"{args.split}-augment-{augment}", exist_ok=True)
        seconds = time.perf_counter() - t0
        per_class = {r.names[int(c)]: float(a) for c, a in zip(r.box.ap_class_index, r.box.ap50)}
        rows.append({"split": args.split, "augment": augment, "mAP50": round(float(r.box.map50), 4),
                     "mAP50_95": round(float(r.box.map), 4),
                     **{f"AP50_{name}": round(a, 4) for name, a in per_class.items()}, "seconds": round(seconds, 1)})
        ap50 = " / ".join(f"{name} {a:.3f}" for name, a in per_class.items())
        print(f"augment={augment!s:5}  mAP50 {float(r.box.map50):.4f}  mAP50-95 {float(r.box.map):.4f}  "
              f"AP50 {ap50}  {seconds:.1f} s")
    out = append_rows(results_csv("detector_tta"), rows, variant=args.variant or model_name(args.weights))
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
