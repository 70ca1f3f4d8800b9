"""Inference cost per crop of each backbone x crop size, on this machine's CPU.

Weights do not change the cost, so untrained networks with the study's head are timed
(batch of 256 crops, channels-last, best of 3). Includes the study's ResNet50 at 224 px.
Rows go to benchmarks/results/classifier_speed.csv.

    python benchmarks/classifier_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from smear.pipeline.report import write_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    import torch

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
    out = Path(__file__).parent / "results" / "classifier_speed.csv"
    write_rows(out, rows)
    print(f"rows: {out}")


def _timed(net, x) -> float:
    t0 = time.perf_counter()
    net(x)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
