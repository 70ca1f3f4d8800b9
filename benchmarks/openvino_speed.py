"""Issue 23: OpenVINO against ONNX Runtime on the shipped models' own ``weights.onnx``, forward pass by forward pass.

The same ONNX files the default runtime runs (the detector, the three members of the classifier cascade) are
compiled by OpenVINO for the CPU and run on the same inputs as ONNX Runtime with smear's session settings
(``smear.configs.runtime.onnx_session``): the detector on batches of BCCD test fields letterboxed as the pipeline
feeds them (4 fields of 640x480), each classifier on batches of 32 crops at its own size, cut from the detector's
boxes on those fields. Calls alternate runtime by runtime (ORT, OV, ORT, OV, ...), on ``--threads`` threads each, and
the median time per call is printed with the OV / ORT ratio. Agreement: the largest absolute difference of the
outputs, and for the detector the boxes kept at the operating thresholds per field, for the classifiers the crops
whose top class differs.

    python benchmarks/openvino_speed.py [--threads 1] [--rounds 7] [--fields 8]

Appends one row per model to benchmarks/results/openvino_speed.csv (benchmarks/_results.py columns first).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _results import append_rows, results_csv, run_stamp


def openvino_model(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    # LATENCY: one stream, the threads given: the pipeline makes one call at a time, as with ONNX Runtime
    return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "NUM_STREAMS": 1})


def timed(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (each times every call once)")
    ap.add_argument("--fields", type=int, default=8, help="BCCD test fields used (batches of 4)")
    ap.add_argument("--data", default="../shared/data/bccd")
    ap.add_argument("--out", type=Path, default=results_csv("openvino_speed"))
    args = ap.parse_args()

    import cv2
    import openvino as ov
    from ultralytics.data.augment import LetterBox

    from smear.classifier.model import load_classifier
    from smear.classifier.predict import crops_from_boxes, to_array
    from smear.configs.offline import ensure_offline
    from smear.configs.paths import resolve_path
    from smear.configs.runtime import onnx_session
    from smear.detector.predict import Detector

    ensure_offline()
    stamp = run_stamp(f"openvino-{ov.__version__.split('-')[0]}-threads{args.threads}")
    root = resolve_path(args.data)
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[:args.fields]
    fields = [cv2.imread(str(root / "JPEGImages" / f"{i}.jpg")) for i in ids]  # BGR

    detector = Detector(None, threads=args.threads, runtime="onnx")
    cascade = load_classifier(None, runtime="onnx", threads=args.threads)
    letterbox = LetterBox(640, auto=True, stride=32)
    det_inputs = [np.ascontiguousarray(np.stack([letterbox(image=im) for im in fields[k:k + 4]])[..., ::-1]
                                       .transpose(0, 3, 1, 2)).astype(np.float32) / 255
                  for k in range(0, len(fields), 4)]
    boxes = [d.boxes for d in detector.predict([im[..., ::-1] for im in fields])]
    members = [("classifier", cascade)] + [(role, m) for role, m in (("refiner", cascade.refiner),
                                                                    ("subtyper", cascade.subtyper)) if m is not None]
    models = [("detector", detector.info.weights.parent / "weights.onnx", det_inputs, None)]
    for role, member in members:
        crops = [c for im, bs in zip(fields, boxes) for c in crops_from_boxes(member, im[..., ::-1].copy(), bs)][:64]
        x = to_array(crops)  # what the cascade feeds each member (normalised, NCHW)
        models.append((role, member.folder / "weights.onnx", [x[k:k + 32] for k in range(0, len(x), 32)], member))

    rows = []
    for name, path, inputs, _ in models:
        ort = onnx_session(path, args.threads)
        in_name = ort.get_inputs()[0].name
        ovm = openvino_model(path, args.threads)
        for x in inputs[:1]:  # first calls compile and cache shapes: not timed
            ort.run(None, {in_name: x})
            ovm(x)
        t_ort, t_ov = [], []
        for _ in range(args.rounds):
            t_ort.append(timed(lambda s=ort, n=in_name, xs=inputs: [s.run(None, {n: x})[0] for x in xs], 1)[0])
            t_ov.append(timed(lambda m=ovm, xs=inputs: [m(x)[0] for x in xs], 1)[0])
        out_ort = [ort.run(None, {in_name: x})[0] for x in inputs]
        out_ov = [np.asarray(ovm(x)[0]) for x in inputs]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(out_ort, out_ov))
        if name == "detector":  # boxes kept at the lowest operating threshold, per field
            a = np.concatenate([(o[:, 4:, :].max(1) >= 0.2).sum(1) for o in out_ort])
            b = np.concatenate([(o[:, 4:, :].max(1) >= 0.2).sum(1) for o in out_ov])
            disagree = f"candidates >= 0.2 per field differ on {int((a != b).sum())} of {len(a)} fields"
        else:
            a = np.concatenate([o.argmax(1) for o in out_ort])
            b = np.concatenate([o.argmax(1) for o in out_ov])
            disagree = f"top class differs on {int((a != b).sum())} of {len(a)} crops"
        per_call = len(inputs)
        m_ort, m_ov = statistics.median(t_ort) / per_call, statistics.median(t_ov) / per_call
        print(f"{name:10s} {tuple(inputs[0].shape)}: ORT {m_ort * 1000:7.1f} ms/call, OpenVINO {m_ov * 1000:7.1f} "
              f"ms/call, OV/ORT {m_ov / m_ort:.2f}; max |diff| {diff:.2e}; {disagree}")
        rows.append({"model": name, "weights": str(path), "input_shape": "x".join(map(str, inputs[0].shape)),
                     "threads": args.threads, "rounds": args.rounds, "ort_ms_per_call": round(m_ort * 1000, 2),
                     "openvino_ms_per_call": round(m_ov * 1000, 2), "ov_over_ort": round(m_ov / m_ort, 3),
                     "max_abs_diff": diff, "disagreement": disagree})
    append_rows(args.out, rows, stamp=stamp)
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
