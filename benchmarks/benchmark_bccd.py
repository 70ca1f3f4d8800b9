"""Benchmark the shipped models (or given ones) on the BCCD test split and print the summary.

Usage:
    python benchmarks/benchmark_bccd.py
    python benchmarks/benchmark_bccd.py --split val --output runs/benchmark/bccd-val
    python benchmarks/benchmark_bccd.py --detector-weights runs/detector/v8n-640-e32/weights/last.pt \\
        --classifier-weights runs/classifier/effl0-96/model

Writes cells.csv, detections.csv, images.csv, summary.json, summary.md and plots to --output, and
appends the run's headline figures (SUMMARY_FIGURES, named by their path in summary.json) as one row
to benchmarks/results/benchmark_bccd.csv (benchmarks/_results.py: date, commit, machine, device,
variant, seed first; --variant defaults to ``shipped``, or the given models' folder names).
Same as ``smear benchmark --split test``, with model choice; takes about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from _results import append_rows, model_name, results_csv, run_stamp

# summary.json figures kept per run in benchmarks/results/benchmark_bccd.csv (the folder keeps the rest)
SUMMARY_FIGURES = (
    "run.split", "run.n_images", "run.n_failed", "run.models.detector.weights", "run.models.classifier.weights",
    "cell.detector.mAP50", "cell.detector.mAP50_95", "cell.detector.AP50.RBC", "cell.detector.AP50.WBC",
    "cell.detector.AP50.Platelets", "cell.detector.precision", "cell.detector.recall", "cell.detector.F1",
    "cell.pipeline.mAP50", "cell.pipeline.mAP50_95", "cell.pipeline.subtype.accuracy",
    "image.detector.count_MAE.RBC", "image.detector.count_MAE.WBC", "image.detector.count_MAE.Platelets",
    "image.detector.audited.WBC.count_MAE", "image.detector.audited.Platelets.count_MAE",
    "image.pipeline.flag_agreement",
)


def summary_row(summary: dict, output: Path) -> dict:
    """One run's row: its output folder and the SUMMARY_FIGURES of its summary.json (empty where absent)."""
    row = {"output": str(output)}
    for name in SUMMARY_FIGURES:
        value = summary
        for key in name.split("."):
            value = value.get(key, "") if isinstance(value, dict) else ""
        row[name] = value
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="BCCD VOC folder (default: ../shared/data/bccd)")
    parser.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmark/bccd-test"), help="output folder")
    parser.add_argument("--detector-weights", default="", help="detector .pt or model folder (default: shipped)")
    parser.add_argument("--classifier-weights", default="", help="classifier model folder (default: shipped)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0, mps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 lets torch decide")
    parser.add_argument("--variant", default=None, help="name of this run in benchmarks/results/benchmark_bccd.csv "
                        "(default: shipped, or DETECTOR+CLASSIFIER folder names when weights are given)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from smear.configs.errors import ModelNotFoundError, SmearError
    from smear.pipeline.benchmark import run_benchmark
    from smear.pipeline.config import PipelineConfig

    cfg = PipelineConfig(detector_weights=args.detector_weights, classifier_weights=args.classifier_weights,
                         device=args.device, threads=args.threads)
    models = (args.detector_weights, args.classifier_weights)
    variant = args.variant or ("shipped" if not any(models) else "+".join(model_name(m) for m in models))
    stamp = run_stamp(variant, device=args.device)  # before the run: the code that ran
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
    summary = json.loads((args.output / "summary.json").read_text())
    out = append_rows(results_csv("benchmark_bccd"), [summary_row(summary, args.output)], stamp=stamp)
    print(f"row: {out} (variant {variant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
