"""Export a detector to ONNX (or TorchScript) as a model folder the pipeline can run.

The folder holds ``weights.onnx`` and the source model's card (thresholds, image size, metrics), so
``--set detector_weights=FOLDER`` gives the same operating point as the model it came from. With
``in_place`` the ONNX file is written into the model folder itself, beside its ``weights.pt``, and the
card records which file is which runtime's: the pipeline's default runtime (onnx) then runs it.
ONNX Runtime ran the shipped detector ~1.15-1.2x faster than PyTorch on the 2-core CPU machine
(``benchmarks/speed_analyze.py --detector-weights FOLDER``).
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

from smear.configs.errors import SmearError
from smear.configs.offline import ensure_offline
from smear.configs.paths import git_commit, resolve_path
from smear.configs.runtime import export_record

from .model import find_detector

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}


def export_detector(weights: str | Path | None = None, format: str = "onnx", out: str | Path | None = None,
                    in_place: bool = False) -> Path:
    """Write ``out/weights.<format>`` and ``out/card.json``; returns the folder.

    ONNX is exported with dynamic axes, so batches and BCCD's 640x480 fields run without padding to a
    square (a fixed 640x640 graph was slower here and found different boxes on padded fields).
    ``in_place`` (ONNX only) writes ``weights.onnx`` into the model folder of ``weights`` (replacing an
    earlier export) and adds ``runtimes`` and ``onnx_export`` (the SHA-256 of the .pt it came from) to its card.
    """
    if format not in FORMATS:
        raise SmearError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if in_place and (out is not None or format != "onnx"):
        raise SmearError("--in-place writes weights.onnx into the model folder itself: give no --out, format onnx")
    ensure_offline()
    from ultralytics import YOLO

    commit = git_commit()  # before weights.onnx is rewritten, which would make the checkout look dirty
    info = find_detector(weights)
    if info.weights.suffix != ".pt":
        raise SmearError(f"{info.weights}: export starts from a PyTorch .pt detector")
    if in_place and info.weights.name != "weights.pt":
        raise SmearError(f"{info.weights}: --in-place needs a model folder holding weights.pt (smear detector package)")
    folder = info.weights.parent if in_place else (
        Path(out) if out else resolve_path("runs/export") / f"{info.weights.parent.name}-{format}")
    target = folder / f"weights{FORMATS[format]}"
    if target.exists() and not in_place:
        raise SmearError(f"{target}: exists; choose another --out or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = Path(tmp) / "weights.pt"  # ultralytics writes the export beside the .pt it reads
        shutil.copyfile(info.weights, source)
        try:
            # simplify (onnxslim) measured here: no faster under ONNX Runtime, which optimises the graph itself
            kwargs = {"dynamic": True, "simplify": False} if format == "onnx" else {}
            made = Path(YOLO(str(source), task="detect").export(format=format, imgsz=info.imgsz, **kwargs))
        except Exception as e:  # noqa: BLE001  a missing exporter package is the usual cause
            raise SmearError(f"{info.weights}: export to {format} failed ({type(e).__name__}: {e}); "
                             "for ONNX: pip install 'smear[onnx]'") from e
        made.replace(target)
    card = dict(info.card)
    if in_place:
        import torch

        card["runtimes"] = {"torch": "weights.pt", "onnx": target.name}
        card["onnx_export"] = export_record(info.weights, commit, imgsz=info.imgsz, dynamic_axes=True,
                                            torch=torch.__version__.split("+")[0])
    else:
        card["runtimes"] = {"onnx" if format == "onnx" else "torchscript": target.name}
        card["export"] = {"format": format, "from": str(info.weights), "imgsz": info.imgsz,
                          "dynamic_axes": format == "onnx", "date": datetime.date.today().isoformat(),
                          "commit": commit}
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    if in_place and (folder / "card.md").is_file():
        from smear.configs.modelcard import card_title, write_card

        write_card(folder, card, card.get("title") or card_title("detector", folder))
    return folder
