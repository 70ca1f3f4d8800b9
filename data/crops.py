"""The one crop function: training and inference cut cells the same way; and the crop manifest.

Every classifier input is a square around a cell, cut by :func:`crop_square` (affine warp, edges
replicated). :func:`crop_cell` places that square on a box; training adds a rotation, zoom and
shift to the same warp, so a cell at the field's edge looks the same to a model in training and in
use.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from smear.configs.errors import SmearError

from .taxonomy import CELL_CLASSES


def crop_square(image: np.ndarray, cx: float, cy: float, side_px: float, size_px: int,
                angle_deg: float = 0.0) -> np.ndarray:
    """Square of ``side_px`` centred on (cx, cy), rotated by ``angle_deg``, resized to ``size_px``.

    Parts outside the image are filled by border replication, so a cell on the edge keeps its
    place in the crop. One affine warp does the crop, rotation, border fill and resize.
    """
    import cv2

    scale = size_px / max(side_px, 1.0)
    a, b = scale * math.cos(math.radians(angle_deg)), scale * math.sin(math.radians(angle_deg))
    # cv2.getRotationMatrix2D's rotation about (cx, cy), then (cx, cy) moved to the crop centre
    m = np.array([[a, b, size_px / 2 - a * cx - b * cy], [-b, a, size_px / 2 + b * cx - a * cy]], dtype=np.float32)
    return cv2.warpAffine(image, m, (size_px, size_px), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def crop_cell(image: np.ndarray, box: Iterable[float], margin: float, size: int, *, angle_deg: float = 0.0,
              zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Square crop centred on ``box``, side = longest box side x (1 + 2 margin), resized to ``size``.

    Training jitters the same crop: ``angle_deg`` rotates it, ``zoom`` scales its side, ``shift``
    moves its centre by a fraction of the box width and height. The defaults are the inference crop.

    Example:
        >>> crop = crop_cell(field_rgb, (120, 80, 170, 128), margin=0.15, size=48)
    """
    x1, y1, x2, y2 = box
    cx = (x1 + x2) / 2 + shift[0] * (x2 - x1)
    cy = (y1 + y2) / 2 + shift[1] * (y2 - y1)
    side = max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * margin) * zoom
    return crop_square(image, cx, cy, side, size, angle_deg)


def mirrored_point_crop(image: np.ndarray, x: float, y: float, side_px: float, size_px: int) -> np.ndarray:
    """The RBC morphology crop before :func:`crop_square` existed: the field mirrored outside the image.

    Only models trained on such crops use it (card ``crop.border: reflect_101``: the shipped
    ``chula-morphology``), so they predict exactly as before; retraining moves a model to :func:`crop_square`.
    """
    import cv2

    scale = size_px / max(side_px, 1.0)
    m = cv2.getRotationMatrix2D((float(x), float(y)), 0.0, scale)
    m[0, 2] += size_px / 2 - x
    m[1, 2] += size_px / 2 - y
    return cv2.warpAffine(image, m, (size_px, size_px), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


# ---------------------------------------------------------------- the crop manifest of 'smear data prepare'

@dataclass
class CropRow:
    """One labelled box of the manifest."""

    image: str
    box: tuple[float, float, float, float]
    label: str
    split: str
    image_id: str
    source: str = ""  # the lab / data set (manifest column ``source``), for leave-one-lab-out


def read_manifest(path: Path, classes: Sequence[str] = CELL_CLASSES) -> list[CropRow]:
    """Rows of a crop manifest whose label is one of ``classes`` (plain 'WBC' rows are left out of cell classes).

    A manifest without a ``source`` column (written before it existed) names its rows' source after the set's
    folder (``runs/prepared/bccd/crops/manifest.csv`` -> ``bccd``)."""
    if not Path(path).is_file():
        raise SmearError(f"{path}: crop manifest not found; make it with 'smear data prepare'")
    rows = []
    folder = Path(path).resolve().parent
    default_source = (folder.parent.name if folder.name == "crops" else folder.name).lower()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["label"] in classes:
                rows.append(CropRow(r["source_image"], (float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"])),
                                    r["label"], r["split"], r.get("image_id") or r["source_image"],
                                    r.get("source") or default_source))
    return rows


class ImageCache:
    """Source fields decoded once (RGB), shared by all crops of an image; ``transform`` (e.g. a stain
    normalisation) is applied to each field once, after decoding."""

    def __init__(self, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._images: dict[str, np.ndarray] = {}
        self._transform = transform

    def get(self, path: str) -> np.ndarray:
        if path not in self._images:
            from .images import read_image

            image = read_image(path)
            self._images[path] = image if self._transform is None else self._transform(image)
        return self._images[path]
