"""Stain normalisation before detection, only for fields whose colours are unlike every training lab's.

Each field is described by the mean and spread of its L*a*b* channels (six numbers). The detector's card keeps,
per lab it trained on, the mean and the field-to-field standard deviation of those six numbers
(``stain_norm``). A field within ``tolerance`` standard deviations of some training lab on all six is detected as
it is: the detector knows those colours. A field further from all of them (a lab the detector never saw) is mapped
onto the nearest lab's colours first (Reinhard et al., "Color transfer between images", IEEE CG&A 2001: per
L*a*b* channel, ``(x - mean_field) / std_field * std_lab + mean_lab``). Measured on 2026-12-01: training labs'
own val fields lie within 3.0 SD of their lab and at least 5 SD from the others (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

METHOD = "reinhard-lab-nearest"
TOLERANCE_SD = 4.0


def lab_stats(image_rgb: np.ndarray) -> np.ndarray:
    """The six numbers that describe a field's colours: mean, then standard deviation, of L*, a*, b* (OpenCV's
    8-bit scale) of an RGB uint8 image."""
    import cv2

    lab = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    return np.concatenate([lab.mean(0), lab.std(0)])


@dataclass(frozen=True)
class LabColours:
    """One training lab: the mean and field-to-field SD of its fields' six colour numbers."""

    name: str
    mean: tuple[float, ...]
    sd: tuple[float, ...]
    fields: int

    def distance(self, stats: np.ndarray) -> float:
        """The largest of the six |field - lab mean| / lab SD."""
        return float(np.max(np.abs(stats - np.asarray(self.mean)) / np.maximum(np.asarray(self.sd), 1e-3)))


@dataclass(frozen=True)
class StainReference:
    """The training labs' colours; :meth:`normalise` maps a field unlike all of them onto the nearest."""

    labs: tuple[LabColours, ...]
    tolerance: float = TOLERANCE_SD

    @classmethod
    def from_images(cls, images_by_lab: Mapping[str, Iterable[np.ndarray]],
                    tolerance: float = TOLERANCE_SD) -> "StainReference":
        labs = []
        for name, images in images_by_lab.items():
            stats = np.array([lab_stats(im) for im in images])
            if len(stats) < 2:
                raise ValueError(f"{name}: a lab's colours need at least 2 fields, got {len(stats)}")
            labs.append(LabColours(name, tuple(round(float(v), 3) for v in stats.mean(0)),
                                   tuple(round(float(v), 3) for v in stats.std(0)), len(stats)))
        return cls(tuple(labs), tolerance)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "StainReference | None":
        """The card's ``stain_norm`` entry, or None when it has none."""
        entry = card.get("stain_norm")
        if not entry:
            return None
        if entry.get("method") != METHOD:
            raise ValueError(f"stain_norm method {entry.get('method')!r} is not supported (only {METHOD!r})")
        return cls(tuple(LabColours(lab["name"], tuple(lab["mean"]), tuple(lab["sd"]), int(lab["fields"]))
                         for lab in entry["labs"]), float(entry.get("tolerance_sd", TOLERANCE_SD)))

    def to_card(self) -> dict[str, Any]:
        return {"method": METHOD, "tolerance_sd": self.tolerance, "statistics": "L*a*b* mean and SD per field",
                "labs": [{"name": lab.name, "mean": list(lab.mean), "sd": list(lab.sd), "fields": lab.fields}
                         for lab in self.labs]}

    def nearest(self, stats: np.ndarray) -> tuple[LabColours, float]:
        distances = [lab.distance(stats) for lab in self.labs]
        k = int(np.argmin(distances))
        return self.labs[k], distances[k]

    def normalise(self, image_rgb: np.ndarray) -> tuple[np.ndarray, str | None]:
        """``(field, lab)``: the field as it is and None when its colours are a training lab's, else the field
        mapped onto the nearest lab's colours and that lab's name."""
        import cv2

        stats = lab_stats(image_rgb)
        lab, distance = self.nearest(stats)
        if distance <= self.tolerance:
            return image_rgb, None
        target_mean, target_sd = np.asarray(lab.mean[:3], np.float32), np.asarray(lab.mean[3:], np.float32)
        lab_img = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        lab_img = (lab_img - stats[:3]) / np.maximum(stats[3:], 1e-3) * target_sd + target_mean
        return cv2.cvtColor(np.clip(lab_img + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB), lab.name


def reference_from_fields(fields: Sequence[tuple[str, str]], every: int = 1,
                          tolerance: float = TOLERANCE_SD) -> StainReference:
    """A reference from ``(lab, image path)`` pairs (a model's training fields), every ``every``-th of each lab."""
    from smear.data.images import read_image

    by_lab: dict[str, list[str]] = {}
    for lab, path in fields:
        by_lab.setdefault(lab, []).append(path)
    return StainReference.from_images({lab: (read_image(p) for p in paths[::every]) for lab, paths in by_lab.items()},
                                      tolerance)
