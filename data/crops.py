"""The one crop function: training and inference cut cells the same way."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def crop_cell(image: np.ndarray, box: Iterable[float], margin: float, size: int) -> np.ndarray:
    """Square crop centred on ``box``, side = longest box side x (1 + 2 margin), resized to ``size``.

    Parts outside the image are filled by border replication, so cells on the edge keep
    their place in the crop. The same function serves training and inference.
    """
    import cv2

    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * margin)
    h, w = image.shape[:2]
    # Affine warp does crop, border fill and resize in one pass.
    scale = size / side
    m = np.array([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]], dtype=np.float32)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
