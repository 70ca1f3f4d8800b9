"""``smear analyze --engine ray`` against the local engine: wall time of the whole command, start-up included.

The 72 BCCD test fields (ImageSets/Main/test.txt), each used ``--copies`` times (default 4: 288 fields), are
symlinked into as many slide folders of a temporary folder; each pass runs ``smear -q analyze DIR --output OUT
--engine E`` in a fresh process (models loaded, Ray started and stopped inside the timed span) and checks the outputs
are the same as the local engine's. Passes alternate the order (local, ray, then ray, local, ...), so a machine that
gets busier or quieter over the run does not favour one engine. Prints images/s per pass and the ray / local time
ratio, and appends one row per pass to benchmarks/results/engine_ray.csv (benchmarks/_results.py).

    python benchmarks/engine_ray.py [--copies 4] [--repeats 1] [--first ray] [--ray-address HOST:PORT]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _results import append_rows, results_csv, run_stamp

SAME_FILES = ("results.jsonl", "summary.csv", "slides.json", "slides.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--copies", type=int, default=4, help="slide folders, each holding every test field")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of passes (order alternated)")
    ap.add_argument("--first", choices=("local", "ray"), default="local", help="the engine of the first pass")
    ap.add_argument("--ray-address", default=None, help="a running cluster (default: a local one per pass)")
    ap.add_argument("--out", type=Path, default=results_csv("engine_ray"), help="table the rows are appended to")
    ap.add_argument("--variant", default=None, help="name of this run in the table (default: local-cluster or "
                    "remote-cluster)")
    args = ap.parse_args()

    from smear.configs.paths import resolve_path

    root = resolve_path(args.data)
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()
    stamp = run_stamp(args.variant or ("remote-cluster" if args.ray_address else "local-cluster"))
    work = Path(tempfile.mkdtemp(prefix="smear-engine-ray-"))
    try:
        inputs = work / "in"
        for copy in range(args.copies):
            (inputs / f"slide{copy + 1}").mkdir(parents=True)
            for i in ids:
                (inputs / f"slide{copy + 1}" / f"{i}.jpg").symlink_to(root / "JPEGImages" / f"{i}.jpg")
        n_fields = len(ids) * args.copies
        rows = []
        for repeat in range(args.repeats):
            order = ("local", "ray") if (repeat % 2 == 0) == (args.first == "local") else ("ray", "local")
            for engine in order:
                out = work / f"out-{engine}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = ["smear", "-q", "analyze", str(inputs), "--output", str(out), "--engine", engine]
                if engine == "ray" and args.ray_address:
                    cmd += ["--ray-address", args.ray_address]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
                rows.append({"repeat": repeat, "engine": engine, "fields": n_fields, "seconds": round(seconds, 2),
                             "images_per_s": round(n_fields / seconds, 3)})
                print(f"pass {repeat + 1} {engine:<5} {n_fields} fields in {seconds:7.1f} s: "
                      f"{n_fields / seconds:.2f} images/s", flush=True)
            same = all(filecmp.cmp(work / "out-local" / f, work / "out-ray" / f, shallow=False) for f in SAME_FILES)
            rows[-1]["same_outputs"] = rows[-2]["same_outputs"] = same
            print(f"pass {repeat + 1}: ray outputs {'the same as' if same else 'DIFFER from'} the local engine's")
        local = statistics.median(r["seconds"] for r in rows if r["engine"] == "local")
        ray = statistics.median(r["seconds"] for r in rows if r["engine"] == "ray")
        for r in rows:
            r["ray_over_local"] = round(ray / local, 3)
        print(f"median: local {local:.1f} s ({n_fields / local:.2f} images/s), ray {ray:.1f} s "
              f"({n_fields / ray:.2f} images/s); ray / local time {ray / local:.2f}")
        print(f"rows appended to {append_rows(args.out, rows, stamp=stamp)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
