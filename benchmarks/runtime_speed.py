"""Issue 23: 'smear analyze' end to end with the default runtime (onnx) against --set runtime=torch.

The 72 BCCD test fields are linked into a temporary folder and analysed by the installed ``smear`` as a
whole process (model loading and outputs included), the variants taking turns run by run (A B A B ...,
the order flipped every other round) so that a machine whose speed drifts, or whose other jobs come and
go, weighs on each alike. Per run: wall and CPU seconds and the 1-minute load average before it; per
variant: the median wall time and its ratio to torch; and whether each field's counts equal torch's
(every field whose counts differ is printed with the difference).

``--int8`` adds a variant whose classifier cascade runs int8 ONNX weights (onnxruntime.quantization.
quantize_dynamic of each member's weights.onnx, in a temporary copy of the folders), to see whether it is
faster and whether counts change.

    python benchmarks/runtime_speed.py [--repeats 3] [--int8] [--images 72]

Appends one row per run to benchmarks/results/runtime_speed.csv (benchmarks/_results.py columns first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _results import append_rows, results_csv, run_stamp

CASCADE = ("bccd-mobilenetv2-48", "bccd-mobilenetv2-96", "bccd-wbc-subtypes-128")


def int8_cascade(dest: Path) -> Path:
    """Copies of the shipped cascade whose weights.onnx are int8 (dynamic quantisation); the primary's folder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from smear.classifier.model import shipped_models_dir

    for name in CASCADE:
        src, out = shipped_models_dir() / name, dest / name
        shutil.copytree(src, out)
        quantize_dynamic(str(src / "weights.onnx"), str(out / "weights.onnx"), weight_type=QuantType.QUInt8)
    return dest / CASCADE[0]


def run_analyze(inputs: Path, out: Path, sets: list[str], threads: int) -> dict:
    """One whole 'smear analyze' process: wall and CPU seconds, load before, counts per field."""
    if out.exists():
        shutil.rmtree(out)
    cmd = ["smear", "analyze", str(inputs), "--output", str(out), "--no-fields", "--set", f"threads={threads}"]
    for s in sets:
        cmd += ["--set", s]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    counts = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        counts[Path(r["image"]).name] = {k: v for k, v in r["counts"].items() if v}
    runtimes = {k: v.get("runtime") for k, v in json.loads((out / "run.json").read_text())["models"].items()}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load_1min_before": load, "counts": counts,
            "runtimes": runtimes, "warnings": [ln for ln in stderr.splitlines() if "runtime onnx" in ln]}


def count_differences(a: dict, b: dict) -> list[tuple[str, dict]]:
    """Fields whose counts differ between two runs: ``(field, {class: b - a})``."""
    out = []
    for field in sorted(set(a) | set(b)):
        ca, cb = a.get(field, {}), b.get(field, {})
        diff = {k: cb.get(k, 0) - ca.get(k, 0) for k in sorted(set(ca) | set(cb)) if cb.get(k, 0) != ca.get(k, 0)}
        if diff:
            out.append((field, diff))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--images", type=int, default=72)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (after one warm-up run each)")
    ap.add_argument("--threads", type=int, default=0, help="PipelineConfig.threads (0: one per core)")
    ap.add_argument("--int8", action="store_true", help="also the int8 (dynamic quantisation) classifier cascade")
    ap.add_argument("--out", type=Path, default=results_csv("runtime_speed"))
    ap.add_argument("--variant", default=None, help="name of this run in the table (default: threadsN, or "
                    "'default' for threads 0)")
    args = ap.parse_args()

    from smear.configs.paths import resolve_path

    root = resolve_path(args.data)
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[: args.images]
    stamp = run_stamp(args.variant or (f"threads{args.threads}" if args.threads else "default"))
    with tempfile.TemporaryDirectory(prefix="runtime_speed_") as tmp:
        tmp = Path(tmp)
        inputs = tmp / "fields"
        inputs.mkdir()
        for i in ids:
            (inputs / f"{i}.jpg").symlink_to(root / "JPEGImages" / f"{i}.jpg")
        variants = {"onnx": [], "torch": ["runtime=torch"]}
        if args.int8:
            variants["onnx-int8"] = [f"classifier_weights={int8_cascade(tmp / 'int8')}"]
        names = list(variants)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rnd in range(args.repeats + 1):  # round 0 warms the file cache and the interpreter's imports
            for name in (names if rnd % 2 else names[::-1]):
                r = run_analyze(inputs, tmp / f"out-{name}", variants[name], args.threads)
                r["round"] = rnd
                print(f"round {rnd} {name:10s} wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                      f"load {r['load_1min_before']:.2f}  runtimes {r['runtimes']}", flush=True)
                for w in r["warnings"]:
                    print(f"  warning: {w}")
                if rnd:
                    runs[name].append(r)
    torch_counts = runs["torch"][-1]["counts"]
    rows = []
    median = {n: statistics.median(r["wall_s"] for r in runs[n]) for n in names}
    median_cpu = {n: statistics.median(r["cpu_s"] for r in runs[n]) for n in names}
    print(f"\n{len(ids)} BCCD test fields, {args.repeats} runs each (medians); load average (1 min) seen: "
          f"{min(r['load_1min_before'] for v in runs.values() for r in v):.2f}-"
          f"{max(r['load_1min_before'] for v in runs.values() for r in v):.2f} on {os.cpu_count()} CPUs")
    for n in names:
        diffs = count_differences(torch_counts, runs[n][-1]["counts"])
        cells = sum(sum(c.values()) for c in torch_counts.values())
        changed = sum(abs(v) for _, d in diffs for v in d.values())
        print(f"{n:10s} wall {median[n]:6.2f} s  cpu {median_cpu[n]:6.2f} s  torch/this wall "
              f"{median['torch'] / median[n]:.3f}x  cpu {median_cpu['torch'] / median_cpu[n]:.3f}x  "
              f"fields with other counts than torch: {len(diffs)}/{len(torch_counts)} "
              f"({changed} of {cells} counted cells, {100 * changed / max(cells, 1):.2f}%)")
        for field, d in diffs:
            print(f"    {field}: {d}")
        for r in runs[n]:
            rows.append({"run": n, "round": r["round"], "images": len(ids), "threads": args.threads,
                         "wall_s": round(r["wall_s"], 3), "cpu_s": round(r["cpu_s"], 3),
                         "load_1min_before": round(r["load_1min_before"], 2),
                         "speedup_wall_vs_torch_median": round(median["torch"] / median[n], 3),
                         "fields_counts_differ_vs_torch": len(diffs), "cells_counted_differently": changed})
    print(f"rows: {append_rows(args.out, rows, stamp=stamp)}")


if __name__ == "__main__":
    main()
