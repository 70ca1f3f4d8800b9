"""Box geometry through torchvision.ops: IoU of two boxes or of two sets."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box in ``a`` (N, 4) with every box in ``b`` (M, 4), shape (N, M); 0 where a union is empty."""
    import torch
    from torchvision.ops import box_iou as _box_iou

    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.nan_to_num(_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), nan=0.0)


def box_iou(a: Iterable[float], b: Iterable[float]) -> float:
    """IoU of two xyxy boxes."""
    return float(iou_matrix(np.asarray(list(a)), np.asarray(list(b)))[0, 0])
