"""Issue 5 memory target: peak memory flat over a 1,000-image batch of ``smear analyze --output``.

Runs the analyze command in-process (the same function as ``smear analyze DIR --output OUT``:
Analyzer, slide aggregation, ResultWriter with results.jsonl, summary.csv, overlays/, slides.json
and report.html) on N fields made by cycling the 364 BCCD fields (symlinks with unique names in a
temporary folder: one slide). The process RSS is sampled after every image, as the command's
on_result hands it to ``ResultWriter.add``, and once more after the command returns (the slide
aggregation, ``writer.close`` and the report included), with the peak RSS so far (getrusage
ru_maxrss). Prints the RSS after images 100, 500 and N, the slope in MB per 1,000 images fitted
over images 100..N, and the peak.

Appends one row per sample to benchmarks/results/memory_batch.csv (benchmarks/_results.py: date,
commit, machine, device, variant, seed first), so a before/after pair of ``--variant`` runs sits in one
table; the figures are computed from those rows (``--summary`` prints those of the latest run of a
variant again without running).

    python benchmarks/memory_batch.py --images 1000 --threads 1 --variant after
    python benchmarks/memory_batch.py --summary --variant before
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from _results import append_rows, latest_run, read_rows, results_csv, run_stamp

RESULTS = results_csv("memory_batch")


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def link_fields(source: Path, folder: Path, n: int) -> list[Path]:
    """N symlinks cycling over the source fields, each with a unique name (input order = name order)."""
    fields = sorted(source.glob("*.jpg"))
    folder.mkdir(parents=True)
    links = []
    for i in range(n):
        link = folder / f"{i:05d}_{fields[i % len(fields)].name}"
        link.symlink_to(fields[i % len(fields)].resolve())
        links.append(link)
    return links


def run_rows(variant: str) -> list[dict]:
    """The rows of the latest stored run of a variant (numbers as numbers)."""
    try:
        rows = latest_run(read_rows(RESULTS), variant)
    except ValueError as e:
        raise SystemExit(f"memory_batch: {e}")
    for r in rows:
        r["image"] = int(r["image"])
        for k in ("rss_mb", "peak_rss_mb", "elapsed_s"):
            r[k] = float(r[k])
    return rows


def slope_mb_per_1000(per_image: list[dict], first: int) -> float | None:
    """Least-squares slope of RSS over images ``first``..N, in MB per 1,000 images."""
    fit = [r for r in per_image if r["image"] >= first]
    if len(fit) < 2:
        return None
    return float(np.polyfit([r["image"] for r in fit], [r["rss_mb"] for r in fit], 1)[0] * 1000)


def print_summary(rows: list[dict]) -> None:
    """The figures of one run, computed from its rows."""
    per_image = [r for r in rows if r["stage"] == "image"]
    closed = next(r for r in rows if r["stage"] == "closed")
    rss_at = {r["image"]: r["rss_mb"] for r in per_image}
    n = len(per_image)
    print(f"variant {closed['variant']} ({closed['date']}, {closed['commit']}), {n} images, "
          f"{closed['threads']} thread(s), "
          f"{closed['elapsed_s']:.0f} s ({n / closed['elapsed_s']:.2f} img/s)")
    for k in sorted({100, 500, 1000, n} & rss_at.keys()):
        print(f"RSS after image {k:>5}: {rss_at[k]:8.1f} MB")
    print(f"RSS after close:       {closed['rss_mb']:8.1f} MB")
    for first in (100, n // 2):
        slope = slope_mb_per_1000(per_image, first)
        print(f"slope over images {first}..{n}: " + (f"{slope:+.1f} MB per 1000 images" if slope is not None else "n/a"))
    print(f"peak RSS (ru_maxrss, close and report included): {closed['peak_rss_mb']:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--variant", "--label", default="run", help="name of this run in the table (e.g. before, after)")
    ap.add_argument("--keep-output", type=Path, default=None, help="write the analyze outputs here and keep them")
    ap.add_argument("--summary", action="store_true",
                    help="print the figures of the latest run of --variant from the table; run nothing")
    args = ap.parse_args()
    if args.summary:
        print_summary(run_rows(args.variant))
        return

    import torch

    torch.set_num_threads(args.threads)
    from smear.configs.paths import resolve_path
    from smear.pipeline import report
    from smear.pipeline.cli import app

    stamp = run_stamp(args.variant)  # before the run: the code that ran, not whatever is edited meanwhile
    rows: list[dict] = []
    t0 = time.perf_counter()
    original_add = report.ResultWriter.add

    def sampled_add(self, result, image_rgb=None):
        original_add(self, result, image_rgb)
        rows.append({"stage": "image", "image": self.count, "rss_mb": round(rss_mb(), 2),
                     "peak_rss_mb": round(peak_rss_mb(), 2), "elapsed_s": round(time.perf_counter() - t0, 2)})

    report.ResultWriter.add = sampled_add  # the command's on_result calls writer.add once per image
    with tempfile.TemporaryDirectory(prefix="memory_batch_") as tmp:
        inputs = Path(tmp) / "fields"
        link_fields(resolve_path(args.data) / "JPEGImages", inputs, args.images)
        out = args.keep_output or Path(tmp) / "out"
        stdout = io.StringIO()  # the per-image table: not part of the measure, kept off the terminal
        with contextlib.redirect_stdout(stdout):
            app(["analyze", str(inputs), "--output", str(out), "--set", f"threads={args.threads}"],
                standalone_mode=False)
        rows.append({"stage": "closed", "image": args.images, "rss_mb": round(rss_mb(), 2),
                     "peak_rss_mb": round(peak_rss_mb(), 2), "elapsed_s": round(time.perf_counter() - t0, 2)})
    for r in rows:
        r.update(threads=args.threads)
    append_rows(RESULTS, rows, stamp=stamp)
    print_summary(run_rows(args.variant))
    print(f"rows: {RESULTS}")


if __name__ == "__main__":
    main()
