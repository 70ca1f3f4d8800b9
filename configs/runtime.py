"""The runtimes a model folder can run in: its ``weights.onnx`` under ONNX Runtime (the default, faster per
core on a CPU) or its ``weights.pt`` under PyTorch; which file is which runtime's is recorded in its card.

A folder's card says ``"runtimes": {"torch": "weights.pt", "onnx": "weights.onnx"}`` and, under
``onnx_export``, the SHA-256 of the ``weights.pt`` the ONNX file was exported from: a folder retrained
since its export (another ``weights.pt``) runs on torch until it is exported again, never on stale weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "torch")
ONNX_FILE = "weights.onnx"
TORCH_FILE = "weights.pt"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime cannot run here (not installed), or None when it can."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


def export_record(source: Path, commit: str | None = None, **extra: Any) -> dict:
    """The card's record of an ONNX export from ``source`` (a ``weights.pt``); ``commit`` taken before any
    card of the export was written (default: now)."""
    import datetime

    from .paths import git_commit

    return {"from": source.name, "from_sha256": file_sha256(source), "date": datetime.date.today().isoformat(),
            "commit": commit or git_commit(), **extra}


def onnx_weights(folder: Path, card: Mapping[str, Any], export_how: str) -> tuple[Path | None, str | None]:
    """The folder's ``weights.onnx`` when the onnx runtime can run it, else ``(None, why not)``.

    It must exist, ONNX Runtime must be installed, and when the folder also holds a ``weights.pt`` the card
    must record that the ONNX file was exported from that very file (its SHA-256). ``export_how`` is the
    command that writes the file, for the reason.
    """
    onnx = folder / ONNX_FILE
    if not onnx.is_file():
        return None, f"{folder} has no {ONNX_FILE} (write it with '{export_how}')"
    missing = onnxruntime_missing()
    if missing:
        return None, missing
    torch_file = folder / TORCH_FILE
    if torch_file.is_file():
        made_from = (card.get("onnx_export") or {}).get("from_sha256")
        if made_from != file_sha256(torch_file):
            return None, (f"{onnx} was not exported from this folder's {TORCH_FILE} (retrained since?); "
                          f"export it again with '{export_how}'")
    return onnx, None


def warn_torch_fallbacks(reasons: list[str], what: str = "the same results") -> None:
    """One warning for every model meant for ONNX Runtime that runs on torch (``reasons``, one line each; nothing
    when empty). Never an error: torch gives ``what``, slower."""
    if reasons:
        log.warning("runtime onnx: %s; %s on torch (%s, slower)", "; ".join(reasons),
                    "these run" if len(reasons) > 1 else "it runs", what)


def unreadable(path: Path, error: Exception, export_how: str) -> str:
    """Why a ``weights.onnx`` ONNX Runtime cannot load (truncated, corrupt) runs on torch: one line."""
    first = (str(error).strip().splitlines() or [""])[0][:120]
    return (f"{path} cannot be read by ONNX Runtime ({type(error).__name__}: {first}); export it again with "
            f"'{export_how}'")


def onnx_session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads that logs nothing below errors.

    Its threads sleep between calls instead of spinning: the pipeline alternates two or three sessions with
    torch and numpy work on the same cores, and a spinning pool would take their time.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no provider or graph notes on stderr
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
