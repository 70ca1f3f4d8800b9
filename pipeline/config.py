"""The pipeline's config: operating thresholds, capture mode, calibration, outputs."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from smear.classifier.config import SUBTYPE_VIEWS
from smear.configs.errors import ConfigError
from smear.configs.loader import param
from smear.data.taxonomy import GROUPS, _canonical_label
from smear.detector.config import OPERATING_CONF

log = logging.getLogger(__name__)


FROM_DETECTOR = "detector"  # class_conf entry: the operating thresholds of the detector's card


def _from_detector(entry: Any) -> bool:
    return str(entry).strip().lower() == FROM_DETECTOR


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How ``smear analyze`` merges the two stages and which flags it may raise (configs/pipeline.yaml)."""

    detector_weights: str = param("", "detector .pt or model folder; '' for the shipped default")
    classifier_weights: str = param("", "classifier model folder; '' for the shipped default")
    conf: float = param(OPERATING_CONF, "minimum detector score kept for classes class_conf gives no threshold; "
                                        "0.001 gives the full ranked list for mAP (--conf, --set conf or a YAML file "
                                        "that sets conf without class_conf means one threshold for every class)",
                        range=(0.0, 1.0))
    class_conf: tuple[str, ...] = param((FROM_DETECTOR,), "per-class minimum detector score: 'detector' takes the "
                                        "operating thresholds recorded in the detector's card (chosen on val for "
                                        "that model; shipped default: RBC and WBC 0.4, Platelets 0.45; GPU-trained "
                                        "bccd-chula-yolov8n: Platelets 0.55), Class=score sets one class, later "
                                        "entries win; [] uses conf for all")
    iou: float = param(0.5, "detector NMS IoU", range=(0.05, 1.0))
    edge_fragment_min: float = param(0.5, "an RBC cut by the field border is counted only when this fraction of a "
                                          "typical RBC's diameter lies inside (0.5: the field holding its centre "
                                          "counts it); 0 counts every fragment", range=(0.0, 1.0))
    device: str = param("cpu", "torch device: cpu, cuda, cuda:0, mps")
    runtime: str = param("onnx", "'onnx': each model folder's weights.onnx under ONNX Runtime on the CPU (faster per "
                                 "core; a folder without one, or without onnxruntime, runs on torch with a warning); "
                                 "'torch': weights.pt under PyTorch; a device other than cpu runs torch",
                         choices=("onnx", "torch"))
    batch: int = param(8, "images per detector batch", range=(1, 1024))
    threads: int = param(0, "CPU threads of torch and ONNX Runtime; 0: one per core (ultralytics alone would use "
                            "cores - 1)", range=(0, 256))
    scale: str = param("auto", "'auto': measure each image's RBC size and resize it to the detector's training "
                               "scale (tiling what becomes large); or one resize factor for every image, 0.05-20")
    stain_norm: bool = param(False, "map a field whose colours are unlike every lab the detector trained on (its "
                                    "card's stain reference) onto the nearest lab's colours before detection "
                                    "(Reinhard, L*a*b*); the classifier always sees the field as it is. Off by "
                                    "default: measured 2026-12-01 it helped on one unseen lab and not the other "
                                    "(docs/models.md)")
    pixel_size_um: float = param(0.0, "micrometres per pixel of the inputs; 0 if unknown (sizes then in px)", range=(0.0, 100.0))
    group_override_prob: float = param(0.9, "classifier group probability that overrides the detector's group", range=(0.5, 1.0))
    wbc_rescue: float = param(0.9, "a WBC box the detector scores under its WBC threshold (down to 0.02) and that "
                                   "no kept box covers by 30% of its area is kept when the classifier gives it at "
                                   "least this WBC probability, marked for review (detector.below_threshold); 0: off "
                                   "(measured 2026-12-02: Raabin's large pale WBCs, docs/models.md)",
                              range=(0.0, 1.0))
    rbc_rescue: bool = param(True, "keep RBC boxes the detector scores under its RBC threshold (down to 0.05), "
                                    "highest first, while the field's RBC coverage is under 0.95, each only if 30% "
                                    "of its box is red-cell pixels no kept box covers; marked detector.below_threshold "
                                    "(measured 2026-12-02: on labs the detector never saw it scores their RBCs lower; docs/models.md)")
    review_prob: float = param(0.5, "classifier probability for another group that marks a cell for review", range=(0.0, 1.0))
    subtype_views: int = param(0, "test-time augmentation of the WBC subtype call: the mean over 1, 2, 4 or 8 "
                                  "rotations and reflections of each likely WBC's crop (group calls never change); "
                                  "0: the classifier card's choice (1 when it names none)",
                               choices=(0, *SUBTYPE_VIEWS))
    low_confidence_wbc: float = param(0.5, "WBC subtype probability below which a WBC counts as unplaced", range=(0.0, 1.0))
    capture_mode: str = param("wbc-centred", "how fields were chosen; decides which flags apply "
                              "(wbc-centered is accepted for wbc-centred)",
                              choices=("wbc-centred", "random"))
    min_rbc_for_ratio: int = param(300, "RBCs needed before a platelet or WBC ratio is judged", range=(1, None))
    min_wbc_for_differential: int = param(100, "WBCs needed before a differential is judged", range=(1, None))
    min_fields_for_estimate: int = param(10, "fields needed before a per-field estimate is judged", range=(1, None))
    platelet_factor_per_field: float = param(0.0, "calibration: platelets/uL per platelet per field (0 = none)",
                                             range=(0.0, None))
    wbc_factor_per_field: float = param(0.0, "calibration: WBC/uL per WBC per field (0 = none)", range=(0.0, None))
    field_area_um2: float = param(0.0, "calibration: area of one field in um^2 (0 = unknown), reported as density",
                                  range=(0.0, None))
    morphology_weights: str = param("", "RBC morphology model folder; '' for the shipped default if present, 'none' to skip")

    def __post_init__(self) -> None:
        self.thresholds()  # a bad class_conf entry fails when the config is made, not mid-batch
        self.scale_factor()  # 'auto' or a factor in range, else a ConfigError naming the key

    @staticmethod
    def implied(values: dict[str, Any]) -> dict[str, Any]:
        """A layer of values (YAML file, CLI overrides) that sets ``conf`` and not ``class_conf`` means one
        threshold for every class: it clears ``class_conf`` for that layer, so a later layer still wins.

        Example:
            >>> PipelineConfig.implied({"conf": 0.3})
            {'conf': 0.3, 'class_conf': ()}
        """
        if str(values.get("capture_mode", "")).strip().lower() == "wbc-centered":  # US spelling, same mode
            values = {**values, "capture_mode": "wbc-centred"}
        if "conf" in values and values["conf"] is not None and "class_conf" not in values:
            return {**values, "class_conf": ()}
        return values

    def scale_factor(self) -> float | None:
        """The one resize factor ``scale`` names, or None for ``auto``."""
        text = str(self.scale).strip().lower()
        if text == "auto":
            return None
        try:
            k = float(text)
        except ValueError:
            k = float("nan")
        if not 0.05 <= k <= 20.0:
            raise ConfigError(f"PipelineConfig.scale: got {self.scale!r}; valid values are 'auto' or a resize "
                              f"factor between 0.05 and 20")
        return k

    def one_threshold(self, conf: float) -> "PipelineConfig":
        """This config with ``conf`` for every class (``class_conf`` cleared), e.g. for a full ranked list."""
        return dataclasses.replace(self, conf=conf, class_conf=())

    def thresholds(self, detector_card: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Minimum detector score per group: ``conf``, then the ``class_conf`` entries in order.

        The ``detector`` entry gives the ``operating_thresholds`` of ``detector_card`` (a model card's
        per-group thresholds, chosen on val for that model); without a card, or a card without them, it
        gives nothing and ``conf`` stands.

        Example:
            >>> PipelineConfig(conf=0.4, class_conf=("Platelets=0.55",)).thresholds()
            {'RBC': 0.4, 'WBC': 0.4, 'Platelets': 0.55}
            >>> PipelineConfig().thresholds({"operating_thresholds": {"Platelets": 0.55}})
            {'RBC': 0.4, 'WBC': 0.4, 'Platelets': 0.55}
        """

        out = {g: self.conf for g in GROUPS}
        for item in self.class_conf:
            if _from_detector(item):
                tuned = (detector_card or {}).get("operating_thresholds") or {}
                out.update({g: float(t) for g, t in tuned.items() if g in out})
                continue
            name, sep, value = str(item).replace(":", "=", 1).partition("=")
            group = _canonical_label(name) if sep else ""
            try:
                score = float(value)
            except ValueError:
                score = float("nan")
            if group not in GROUPS or not 0.0 <= score <= 1.0:
                raise ConfigError(f"PipelineConfig.class_conf: got {item!r}; expected '{FROM_DETECTOR}' or "
                                  f"Class=score with Class one of {', '.join(GROUPS)} and score between 0 and 1 "
                                  "(e.g. Platelets=0.55)")
            out[group] = score
        return out

    def for_detector(self, detector_card: Mapping[str, Any] | None) -> "PipelineConfig":
        """This config with the ``detector`` entry of ``class_conf`` replaced by that detector's thresholds.

        The result names every threshold explicitly, so what a run records is what it counted with.

        Example:
            >>> PipelineConfig().for_detector({"operating_thresholds": {"Platelets": 0.55}}).class_conf
            ('Platelets=0.55',)
        """
        if not any(_from_detector(i) for i in self.class_conf):
            return self
        own = self.thresholds(detector_card)
        if self.conf != OPERATING_CONF and all(t != self.conf for t in own.values()):
            log.warning(
                "conf %g is used for no class: class_conf %s sets every class (%s); for one threshold give "
                "--conf, or class_conf: [] beside conf in the YAML", self.conf, list(self.class_conf),
                ", ".join(f"{g} {t:g}" for g, t in own.items()))
        return dataclasses.replace(self, class_conf=tuple(f"{g}={t:g}" for g, t in own.items() if t != self.conf))
