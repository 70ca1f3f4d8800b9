"""Export a detector to ONNX (or TorchScript) as a model folder the pipeline can run.

The folder holds ``weights.onnx`` and the source model's card (thresholds, image size, metrics), so
``--set detector_weights=FOLDER`` gives the same operating point as the model it came from.
ONNX Runtime ran the shipped detector ~1.15-1.2x faster than PyTorch on the 2-core CPU machine
(``benchmarks/speed_analyze.py --detector-weights FOLDER``).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from smear.configs.errors import SmearError
from smear.configs.offline import ensure_offline
from smear.configs.paths import git_commit, resolve_path

from .model import find_detector

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}


def export_detector(weights: str | Path | None = None, format: str = "onnx", out: str | Path | None = None) -> Path:
    """Write ``out/weights.<format>`` and ``out/card.json``; returns the folder.

    ONNX is exported with dynamic axes, so batches and BCCD's 640x480 fields run without padding to a
    square (a fixed 640x640 graph was slower here and found different boxes on padded fields).
    """
    if format not in FORMATS:
        raise SmearError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    ensure_offline()
    from ultralytics import YOLO

    info = find_detector(weights)
    if info.weights.suffix != ".pt":
        raise SmearError(f"{info.weights}: export starts from a PyTorch .pt detector")
    folder = Path(out) if out else resolve_path("runs/export") / f"{info.weights.parent.name}-{format}"
    target = folder / f"weights{FORMATS[format]}"
    if target.exists():
        raise SmearError(f"{target}: exists; choose another --out or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "weights.pt"  # ultralytics writes the export beside the .pt it reads
    shutil.copyfile(info.weights, source)
    try:
        # simplify (onnxslim) measured here: no faster under ONNX Runtime, which optimises the graph itself
        kwargs = {"dynamic": True, "simplify": False} if format == "onnx" else {}
        made = Path(YOLO(str(source), task="detect").export(format=format, imgsz=info.imgsz, **kwargs))
    except Exception as e:  # noqa: BLE001  a missing exporter package is the usual cause
        raise SmearError(f"{info.weights}: export to {format} failed ({type(e).__name__}: {e}); "
                         "for ONNX: pip install 'smear[onnx]'") from e
    finally:
        source.unlink(missing_ok=True)
    if made != target:
        made.replace(target)
    card = dict(info.card)
    card["export"] = {"format": format, "from": str(info.weights), "imgsz": info.imgsz,
                      "dynamic_axes": format == "onnx", "date": datetime.date.today().isoformat(),
                      "commit": git_commit()}
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    return folder
