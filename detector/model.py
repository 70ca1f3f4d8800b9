"""Find and load detector models: a self-describing folder, a bare ultralytics .pt, or its ONNX export."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from smear.configs.errors import ModelNotFoundError, SmearError

DEFAULT_MODEL = "multilab-yolov8n-cpu"


def shipped_models_dir() -> Path:
    return Path(str(resources.files("smear.detector"))) / "models"


@dataclass
class DetectorModelInfo:
    """What a detector model folder says about itself."""

    weights: Path
    card: dict = field(default_factory=dict)
    # runtime onnx asked for but not possible here (no weights.onnx, no onnxruntime, a stale export): why
    onnx_fallback: str | None = None

    @property
    def runtime(self) -> str:
        """``onnx`` for an ONNX file (run by ONNX Runtime), else ``torch``."""
        return "onnx" if self.weights.suffix == ".onnx" else "torch"

    @property
    def imgsz(self) -> int:
        return int(self.card.get("config", {}).get("imgsz", 640))


WEIGHT_SUFFIXES = (".pt", ".onnx", ".torchscript")


def find_detector(weights: str | Path | None = None, runtime: str = "torch") -> DetectorModelInfo:
    """Resolve ``weights`` (a .pt or .onnx file, or a model folder), else the shipped default.

    A folder holds ``weights.pt`` (or ultralytics' ``weights/best.pt``), or ``weights.onnx`` /
    ``weights.torchscript`` as written by 'smear detector export', with its ``card.json``. With
    ``runtime="onnx"`` a folder's ``weights.onnx`` is chosen when its card says it was exported from the
    folder's ``weights.pt`` (:func:`smear.configs.runtime.onnx_weights`); otherwise the .pt, and
    ``onnx_fallback`` says why. A file given by name is that file, whatever the runtime.

    Raises:
        ModelNotFoundError: listing where it looked and how to make the file.
    """
    from smear.configs.runtime import onnx_weights

    looked: list[Path] = []
    candidates = [Path(weights)] if weights else [shipped_models_dir() / DEFAULT_MODEL]
    for c in candidates:
        inside = [c / "weights.pt", c / "weights" / "best.pt", c / "weights.onnx", c / "weights.torchscript"]
        for p in (inside if c.is_dir() or c.suffix not in WEIGHT_SUFFIXES else [c]):
            looked.append(p)
            if p.is_file():
                folder = p.parent if p.parent.name != "weights" else p.parent.parent
                card = {}
                for name in ("card.json",):
                    if (folder / name).is_file():
                        card = json.loads((folder / name).read_text())
                info = DetectorModelInfo(weights=p, card=card)
                if runtime == "onnx" and c.is_dir() and p.suffix != ".onnx":
                    onnx, why = onnx_weights(folder, card, f"smear detector export --weights {folder} --in-place")
                    info = DetectorModelInfo(weights=onnx or p, card=card, onnx_fallback=why)
                return info
    raise ModelNotFoundError(
        f"detector weights not found (looked in {', '.join(map(str, looked))}); train one with "
        f"'smear data prepare' then 'smear detector train', or pass --weights PATH")


def load_yolo(weights: str | Path):
    """ultralytics' YOLO on a weights file, or one line naming the file and what to do when it cannot be read.

    Raises:
        SmearError: a truncated or corrupt file, or a file that is not YOLO weights.
    """
    from ultralytics import YOLO

    try:
        return YOLO(str(weights), task="detect")
    except Exception as e:  # noqa: BLE001  whatever torch/ultralytics raise on a bad file: one line, not a traceback
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise SmearError(f"{weights}: cannot be read as YOLO detector weights ({type(e).__name__}"
                         + (f": {first}" if first else "") + "); reinstall smear to restore a shipped model, or "
                         "train or export one with 'smear detector train' / 'smear detector export'") from None
