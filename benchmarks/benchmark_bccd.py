"""Benchmark the shipped models (or given ones) on the BCCD test split and print the summary.

Usage:
    python benchmarks/benchmark_bccd.py
    python benchmarks/benchmark_bccd.py --split val --output runs/benchmark/bccd-val
    python benchmarks/benchmark_bccd.py --detector-weights runs/detector/v8n-640-e32/weights/last.pt \\
        --classifier-weights runs/classifier/effl0-96/model

Writes cells.csv, detections.csv, images.csv, summary.json, summary.md and plots to --output.
Same as ``smear benchmark --split test``, with model choice; takes about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="BCCD VOC folder (default: ../shared/data/bccd)")
    parser.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmark/bccd-test"), help="output folder")
    parser.add_argument("--detector-weights", default="", help="detector .pt or model folder (default: shipped)")
    parser.add_argument("--classifier-weights", default="", help="classifier model folder (default: shipped)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0, mps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 lets torch decide")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from smear.configs.errors import ModelNotFoundError, SmearError
    from smear.pipeline.benchmark import run_benchmark
    from smear.pipeline.config import PipelineConfig

    cfg = PipelineConfig(detector_weights=args.detector_weights, classifier_weights=args.classifier_weights,
                         device=args.device, threads=args.threads)
    try:
        print(run_benchmark(args.data, args.split, args.output, cfg=cfg))
    except ModelNotFoundError as e:
        print(f"benchmark_bccd: no model to benchmark: {e}\n"
              "Train the models first (smear detector train; smear classifier train) or pass "
              "--detector-weights / --classifier-weights.", file=sys.stderr)
        return 1
    except SmearError as e:
        print(f"benchmark_bccd: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
