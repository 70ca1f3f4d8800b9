"""Weight-space interpolation of two detectors of one architecture (WiSE-FT).

A fine-tune on new data (here: Chula fields at BCCD's scale) gains the new domain and gives up
a little of the old one. Averaging the fine-tuned weights with the weights it started from,
``alpha * tuned + (1 - alpha) * base``, often keeps most of the gain and wins back part of the
loss (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022). It costs no
training: the two checkpoints must share one lineage (the tuned one started from the base).
``alpha`` is a choice: make it on validation data, never on a test split.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from smear.configs.errors import SmearError
from smear.configs.offline import ensure_offline

from .model import find_detector

log = logging.getLogger(__name__)


def _load(weights: str | Path):
    """``(weights path, checkpoint dict, model, card)``; the model is the EMA copy when the checkpoint has one."""
    import torch

    info = find_detector(weights)
    try:
        ckpt = torch.load(info.weights, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SmearError(f"{info.weights}: not a readable ultralytics checkpoint ({type(e).__name__}: {e})") from e
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if model is None or not hasattr(model, "state_dict"):
        raise SmearError(f"{info.weights}: checkpoint holds no model")
    return info.weights, ckpt, model.float(), info.card


def interpolate_detectors(base: str | Path, tuned: str | Path, alpha: float, dest: Path) -> Path:
    """Write ``alpha * tuned + (1 - alpha) * base`` as a model folder (weights.pt fp16, card.json, card.md).

    Floating-point tensors (weights, biases, batch-norm statistics) are interpolated; integer
    buffers are the tuned model's. The card is the tuned model's, with an ``interpolation`` entry
    naming both parents and ``alpha``.

    Raises:
        SmearError: if ``alpha`` is outside [0, 1] or the two models differ in architecture or classes.
    """
    import torch

    from smear.configs.modelcard import write_card

    ensure_offline()
    if not 0.0 <= alpha <= 1.0:
        raise SmearError(f"alpha {alpha}: expected a weight between 0 (base) and 1 (tuned)")
    base_path, _, base_model, _ = _load(base)
    tuned_path, tuned_ckpt, tuned_model, tuned_card = _load(tuned)
    if getattr(base_model, "names", None) != getattr(tuned_model, "names", None):
        raise SmearError(f"{tuned_path}: classes {getattr(tuned_model, 'names', None)} differ from "
                         f"{base_path}'s {getattr(base_model, 'names', None)}")
    sb, st = base_model.state_dict(), tuned_model.state_dict()
    if set(sb) != set(st) or any(sb[k].shape != st[k].shape for k in st):
        raise SmearError(f"{tuned_path} and {base_path}: different architectures; interpolation needs one "
                         f"model fine-tuned from the other")
    mixed = {k: (alpha * v + (1.0 - alpha) * sb[k]) if v.is_floating_point() else v for k, v in st.items()}
    model = copy.deepcopy(tuned_model)
    model.load_state_dict(mixed)
    ckpt = {k: v for k, v in tuned_ckpt.items() if k not in ("optimizer", "ema", "updates", "scaler")}
    ckpt["model"] = model.half()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest / "weights.pt")
    card = copy.deepcopy(tuned_card)
    card["interpolation"] = {"method": "weight-space interpolation (WiSE-FT): alpha * tuned + (1 - alpha) * base",
                             "alpha": alpha, "base": str(base_path), "tuned": str(tuned_path)}
    write_card(dest, card, f"Detector {dest.name}")
    log.info("interpolated detector (alpha %.2f) written to %s", alpha, dest)
    return dest
