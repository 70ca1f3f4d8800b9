"""The full pipeline: fields -> detected and classified cells -> counts, ratios, differential, flags.

Merge rule (documented in docs/cli.md):
- group: the classifier's group when its probability for that group (summed over WBC subtypes)
  is >= ``group_override_prob``; otherwise the detector's group;
- label: the classifier's most probable class within the final group (a WBC subtype, RBC or
  Platelets);
- score: detector score x the classifier's probability of the final group, so a cell both
  stages agree on ranks high and a cell the classifier doubts ranks low;
- review: set when the classifier gives >= ``review_prob`` to a group other than the detector's.
Both opinions stay in each cell record.
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from smear.configs.errors import SmearError
from smear.data.taxonomy import GROUPS, group_of

from .config import PipelineConfig
from .flags import compute_flags
from .progress import progress_bar
from .quality import rbc_coverage
from .results import (
    BatchResult,
    Cell,
    Flag,
    ImageResult,
    SlideResult,
    count_cells,
    differential_from_counts,
    ratios_from_counts,
)

log = logging.getLogger(__name__)

# Crops per classifier forward call. On CPU each new input shape builds and caches new oneDNN conv
# primitives, which fragment the heap; with a detector batch's crops in one call (any count up to
# 256) nearly every batch was a new shape, and memory grew ~0.75 MB per image over a 1,000-image
# batch (benchmarks/memory_batch.py). Chunks of 32 leave at most 32 shapes per model, so memory
# levels off once they are cached; as fast here, and the records identical (200 BCCD fields).
CLASSIFIER_BATCH = 32


class SlideAggregator:
    """Records -> slides: running totals, then each slide's counts, differential, estimates and flags, with its RBC
    morphology. Needs no model: the settings (with the detector card's thresholds) and the morphology model's cell
    size. An :class:`Analyzer` is one; ``smear analyze --engine ray`` makes one from what its actors describe
    (:meth:`Analyzer.describe`), so its driver loads no model.

    Args:
        cfg: the pipeline settings as the Analyzer resolved them (``Analyzer.cfg``).
        morphology_diameter_px: the morphology model's RBC diameter in its training fields; None when no morphology
            model is loaded (no morphology outputs).
    """

    def __init__(self, cfg: PipelineConfig, morphology_diameter_px: float | None = None):
        self.cfg = cfg
        self.morphology_diameter_px = morphology_diameter_px

    def _morphology_domain(self, cells: list[Cell]) -> dict:
        return self._morphology_domain_px(rbc_diameters_px(cells))

    def _morphology_domain_px(self, diameters_px: Sequence[float]) -> dict:
        """Whether fields look like the morphology model's training fields, from their RBC diameters.

        The morphology model learnt one lab's fields (Chula RBC-12, 1000x, ~35-39 px RBCs). Fields
        whose median RBC is far from that size come from another imaging set-up (BCCD's RBCs are
        ~100 px and its stain differs; measured: only 13% of BCCD RBCs are called normal), so no
        morphology call is made there (it would mislead, and costs time); a pixel size overrides.
        """
        median = float(np.median(diameters_px)) if len(diameters_px) else None
        ref = self.morphology_diameter_px or 0.0
        ratio = median / ref if median and ref else None
        in_domain = self.cfg.pixel_size_um > 0 or (ratio is not None and 0.6 <= ratio <= 1.67)
        return {"median_rbc_diameter_px": round(median, 1) if median else None, "model_rbc_diameter_px": ref or None,
                "in_domain": in_domain}

    def _morphology_outputs(self, cells: list[Cell], counts: dict[str, int], n_fields: int) -> tuple[dict, list]:
        from .flags import summarize_morphology

        return self._morphology_outputs_from(summarize_morphology(cells), rbc_diameters_px(cells), counts, n_fields)

    def _morphology_outputs_from(self, summary: dict, diameters_px: Sequence[float], counts: dict[str, int],
                                 n_fields: int) -> tuple[dict, list]:
        """Morphology shares and flags; out of the model's domain, one flag that says why there are none."""
        from .flags import morphology_flags

        domain = self._morphology_domain_px(diameters_px)
        summary["domain"] = domain
        if domain["in_domain"] or domain["median_rbc_diameter_px"] is None:
            return summary, morphology_flags(summary, counts, n_fields)
        ref = domain["model_rbc_diameter_px"]
        return summary, [Flag(
            "rbc_morphology", "insufficient evidence", "morphology calls need fields like the model's training fields",
            f"median RBC diameter {0.6 * ref:.0f}-{1.67 * ref:.0f} px (or a pixel size)",
            f"{domain['median_rbc_diameter_px']:.0f} px", {"fields": n_fields, "rbc": counts.get("RBC", 0)},
            "These fields differ from the morphology model's training images (another magnification or lab), "
            "so no RBC morphology call is made. Give --pixel-size-um if the scale is known, or retrain on your "
            "own labelled cells.")]

    def collect_batch(self, results: Iterable[tuple[ImageResult, np.ndarray | None]], slides_of: Sequence[str],
                      on_result: Callable[[ImageResult, np.ndarray | None], None] | None = None) -> BatchResult:
        """What :meth:`analyze_batch` makes of ``(result, image_rgb)`` pairs in input order, one per name in
        ``slides_of``: each result named with its slide and given to ``on_result``, slides from running totals.

        Shared by both engines: ``smear analyze --engine ray`` (:mod:`smear.pipeline.engine_ray`) feeds it the
        records its actors made.
        """
        totals: dict[str, SlideTotals] = {}
        failed: list[ImageResult] = []
        for (result, image), slide in zip(results, slides_of):
            result.slide = slide
            if on_result:
                on_result(result, image)
            if slide not in totals:
                totals[slide] = SlideTotals(slide, self.cfg.low_confidence_wbc)
            totals[slide].add(result)
            if result.error:
                failed.append(result)
        return BatchResult(slides=[self.slide_result(t) for t in totals.values()], n_images=len(slides_of),
                           failed=failed)

    def aggregate_slide(self, name: str, results: list[ImageResult]) -> SlideResult:
        """Totals, differential with 95% CIs, estimates and flags over the fields of one slide."""
        totals = SlideTotals(name, self.cfg.low_confidence_wbc)
        for r in results:
            totals.add(r)
        return self.slide_result(totals, images=results)

    def slide_result(self, totals: SlideTotals, images: list[ImageResult] | None = None) -> SlideResult:
        """A slide's aggregate from its running totals (:func:`slide_from_totals`), with its RBC morphology.

        ``images`` (default: one record per field without cells, from the totals) becomes
        ``SlideResult.images``.
        """
        slide = slide_from_totals(totals, self.cfg, images)
        if self.morphology_diameter_px is not None:
            from .flags import summarize_morphology_counts

            summary = summarize_morphology_counts(totals.morphology_labels)
            slide.morphology, extra = self._morphology_outputs_from(summary, totals.rbc_diameters_px, slide.counts,
                                                                    totals.n_fields)
            slide.flags += extra
        return slide


class Analyzer(SlideAggregator):
    """Both stages loaded once; ``analyze_images`` runs them on batches of fields.

    Example:
        >>> analyzer = Analyzer(PipelineConfig())
        >>> result = analyzer.analyze_images(["field.jpg"])[0]
        >>> result.counts["Platelets"]
    """

    def __init__(self, cfg: PipelineConfig | None = None):
        from smear.classifier.model import load_classifier
        from smear.configs.runtime import warn_torch_fallbacks
        from smear.detector.predict import Detector

        self.cfg = cfg or PipelineConfig()
        # ONNX Runtime runs on the CPU; another device keeps every stage on torch
        runtime = self.cfg.runtime if self.cfg.device == "cpu" else "torch"
        # the thread count is process-wide: the detector sets it for the classifier too
        self.detector = Detector(self.cfg.detector_weights or None, device=self.cfg.device, threads=self.cfg.threads,
                                 stain_norm=self.cfg.stain_norm, runtime=runtime)
        self.detector.cfg = dataclasses.replace(self.detector.cfg, conf=self.cfg.conf, iou=self.cfg.iou)
        self.cfg = self.cfg.for_detector(self.detector.info.card)  # class_conf 'detector': the card's thresholds
        self.classifier = load_classifier(self.cfg.classifier_weights or None, device=self.cfg.device,
                                          runtime=runtime, threads=self.detector.threads)
        if self.cfg.subtype_views:  # 0: the card's choice
            self.classifier.subtype_views = self.cfg.subtype_views
        self._group_index = {g: [i for i, c in enumerate(self.classifier.classes) if group_of(c) == g] for g in GROUPS}
        self.morphology = None
        if self.cfg.morphology_weights != "none":
            try:
                from smear.classifier.predict import load_morphology_model

                self.morphology = load_morphology_model(self.cfg.morphology_weights or None, device=self.cfg.device,
                                                        runtime=runtime, threads=self.detector.threads)
            except (ImportError, SmearError) as e:
                if self.cfg.morphology_weights:
                    raise
                log.debug("no RBC morphology model: %s", e)
        self.morphology_diameter_px = (float(self.morphology.config.get("cell_diameter_px", 0) or 0)
                                       if self.morphology is not None else None)
        fallbacks = [self.detector.info.onnx_fallback, *self.classifier.onnx_fallbacks(),
                     self.morphology.model.onnx_fallback if self.morphology is not None else None]
        # why a model meant for ONNX Runtime runs on torch, one line each: one warning for the whole set
        self.torch_fallbacks = list(dict.fromkeys(f for f in fallbacks if f))
        warn_torch_fallbacks(self.torch_fallbacks, "the same cells")
        # A given scale wins; else a given pixel size decides it; else each image's RBC size does.
        self.scale: float | str = self.cfg.scale_factor() or "auto"
        if self.scale == "auto" and self.cfg.pixel_size_um > 0 and self.detector.train_pixel_size_um:
            self.scale = self.detector.scale_for_pixel_size(self.cfg.pixel_size_um)

    def info(self) -> dict:
        """What ``smear info`` prints: the models in use and their test metrics."""
        det_card = self.detector.info.card
        cls_card = self.classifier.card
        out = {
            "detector": {"weights": str(self.detector.info.weights), "runtime": self.detector.runtime,
                         "imgsz": self.detector.imgsz,
                         "classes": list(GROUPS), "model": det_card.get("config", {}).get("model"),
                         "date": det_card.get("date"), "commit": det_card.get("commit"),
                         "operating_thresholds": self.cfg.thresholds(),
                         "test_metrics": det_card.get("test_metrics"),
                         "test_metrics_audited": det_card.get("test_metrics_audited")},
            "classifier": {"weights": str(self.classifier.folder), "runtime": self.classifier.runtime,
                           "backbone": cls_card["config"]["backbone"],
                           "crop_size_px": self.classifier.crop_size_px, "crop_margin": self.classifier.crop_margin,
                           "classes": self.classifier.classes, "date": cls_card.get("date"),
                           "commit": cls_card.get("commit"), "test_metrics": cls_card.get("test_metrics")},
        }
        for role, part in (("refiner", self.classifier.refiner), ("subtyper", self.classifier.subtyper)):
            if part is not None:  # the cascade's other members: which crops they see and at what size
                out["classifier"][role] = {"weights": str(part.folder), "runtime": part.runtime,
                                           "backbone": part.card["config"]["backbone"],
                                           "crop_size_px": part.crop_size_px, "classes": part.classes,
                                           "cv_metrics": part.card.get("cv_metrics")}
        if self.morphology is not None:
            out["morphology"] = self.morphology.info()
        return out

    def provenance(self) -> dict:
        """What made a run's results (``run.json``): smear version and commit, date, settings, models."""
        import datetime
        from importlib import metadata

        from smear.configs.loader import config_to_dict
        from smear.configs.paths import git_commit

        try:
            version = metadata.version("smear")
        except metadata.PackageNotFoundError:
            version = "unknown"

        def strip(d: dict) -> dict:  # which models, not their metric tables (those are in the cards)
            return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                    if k not in ("test_metrics", "cv_metrics")}

        return {"smear": version, "commit": git_commit(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "thresholds": self.cfg.thresholds(), "config": config_to_dict(self.cfg), "models": strip(self.info())}

    def describe(self) -> dict:
        """What a :class:`SlideAggregator` and ``run.json`` need of this Analyzer, picklable: ``cfg`` (resolved),
        ``morphology_diameter_px`` and ``run_info`` (:meth:`provenance`)."""
        return {"cfg": self.cfg, "morphology_diameter_px": self.morphology_diameter_px,
                "run_info": self.provenance()}

    def merge(self, boxes: np.ndarray, det_scores: np.ndarray, det_classes: np.ndarray, probs: np.ndarray) -> list[Cell]:
        """Per-cell calls from the two stages' opinions (see the module docstring)."""
        cfg = self.cfg
        classes = self.classifier.classes
        cells = []
        for box, ds, dc, pr in zip(boxes, det_scores, det_classes, probs):
            det_group = GROUPS[int(dc)]
            group_p = {g: float(pr[idx].sum()) for g, idx in self._group_index.items()}
            cls_group = max(group_p, key=group_p.get)
            group = cls_group if group_p[cls_group] >= cfg.group_override_prob else det_group
            idx = self._group_index[group]
            k = idx[int(np.argmax(pr[idx]))]
            top = int(np.argmax(pr))
            review = any(p >= cfg.review_prob for g, p in group_p.items() if g != det_group)
            cells.append(Cell(
                box=[round(float(v), 1) for v in box], group=group, label=classes[k],
                score=round(float(ds) * group_p[group], 4),
                detector={"label": det_group, "score": round(float(ds), 4)},
                classifier={"label": classes[top], "score": round(float(pr[top]), 4),
                            "label_in_group": classes[k], "score_in_group": round(float(pr[k] / max(group_p[group], 1e-9)), 4)},
                review=review))
        return cells

    def rescued(self, cand, probs: np.ndarray) -> list[Cell]:
        """The WBC candidates under the detector's threshold that the classifier gives at least ``wbc_rescue`` WBC
        probability, as cells marked for review."""
        wbc = probs[:, self._group_index["WBC"]].sum(1)
        keep = np.flatnonzero(wbc >= self.cfg.wbc_rescue)
        cells = self.merge(cand.boxes[keep], cand.scores[keep], cand.classes[keep], probs[keep])
        for c in cells:
            c.review = True
            c.detector["below_threshold"] = True
        return cells

    def _finish(self, result: ImageResult) -> ImageResult:
        counts = count_cells(result.cells)
        result.counts = counts
        result.ratios = ratios_from_counts(counts)
        result.differential = differential_from_counts(counts)
        unplaced = count_unplaced_wbc(result.cells, self.cfg.low_confidence_wbc)
        result.flags = compute_flags(counts, result.differential, 1, self.cfg, unplaced,
                                     mean_rbc_diameter_um(result.cells, self.cfg), result.rbc_coverage)
        if self.morphology is not None:
            result.morphology, extra = self._morphology_outputs(result.cells, counts, 1)
            result.flags += extra
        return result

    def analyze_arrays(self, images: Sequence[np.ndarray], names: Sequence[str]) -> list[ImageResult]:
        """Analyse RGB uint8 arrays (one field each)."""
        from smear.classifier.predict import classify_fields
        from smear.detector.coverage import RBC_RESCUE_MIN_SCORE, red_cell_pixels, with_rescued_rbcs
        from smear.detector.predict import RESCUE_MIN_SCORE, Detections, drop_edge_fragments, low_wbc_candidates

        thresholds = self.cfg.thresholds()
        rescue = self.cfg.wbc_rescue > 0 and thresholds["WBC"] > RESCUE_MIN_SCORE
        rbc_rescue = self.cfg.rbc_rescue and thresholds["RBC"] > RBC_RESCUE_MIN_SCORE
        run_at = {**thresholds, **({"WBC": RESCUE_MIN_SCORE} if rescue else {}),
                  **({"RBC": RBC_RESCUE_MIN_SCORE} if rbc_rescue else {})}
        dets = self.detector.predict(list(images), conf=run_at, iou=self.cfg.iou, scale=self.scale,
                                     measure_conf=min(thresholds.values()) if run_at != thresholds else None)
        candidates = [Detections.empty()] * len(dets)
        if rescue:  # WBC boxes under the threshold wait for the classifier; everything else is as without
            split = [low_wbc_candidates(d, thresholds["WBC"]) for d in dets]
            dets, candidates = [k for k, _ in split], [c for _, c in split]
        masks = [red_cell_pixels(img) for img in images]
        if rbc_rescue:  # RBC boxes under the threshold fill the red-cell pixels no kept box covers
            dets = [with_rescued_rbcs(img, d, thresholds["RBC"], cells=m) for d, img, m in zip(dets, images, masks)]
        coverage = [rbc_coverage(img, d.boxes, d.classes, cells=m) for d, img, m in zip(dets, images, masks)]
        for d, name in zip(dets, names):
            if d.warning:
                log.warning("%s: %s", name, d.warning)
        dets = [drop_edge_fragments(d, (img.shape[1], img.shape[0]), self.cfg.edge_fragment_min)
                for d, img in zip(dets, images)]
        # The crops of all images in the batch go to the classifier together: far fewer small forward calls.
        probs = classify_fields(self.classifier, images, [np.concatenate([d.boxes, c.boxes]) for d, c in
                                                          zip(dets, candidates)], batch=CLASSIFIER_BATCH)
        out = []
        for img, name, det, cand, pr, cov in zip(images, names, dets, candidates, probs, coverage):
            cells = self.merge(det.boxes, det.scores, det.classes, pr[:len(det)])
            if rbc_rescue:  # one cell per box, in order
                low = (det.classes == GROUPS.index("RBC")) & (det.scores < thresholds["RBC"])
                for k in np.flatnonzero(low):
                    cells[k].detector["below_threshold"] = True
            if len(cand):
                cells += self.rescued(cand, pr[len(det):])
            if self.morphology is not None and self._morphology_domain(cells)["in_domain"]:
                self.morphology.annotate(img, cells, self.cfg.pixel_size_um or None)
            out.append(self._finish(ImageResult(
                image=name, width=int(img.shape[1]), height=int(img.shape[0]), cells=cells,
                scale=round(det.scale, 4), rbc_diameter_px=det.rbc_diameter_px, rbc_coverage=cov,
                stain_mapped_to=det.stain_mapped_to, warnings=[det.warning] if det.warning else [])))
        return out

    def iter_images(self, paths: Sequence[str | Path], progress: bool = False,
                    previous: Callable[[str, str | None], ImageResult | None] | None = None,
                    ) -> Iterator[tuple[ImageResult, np.ndarray | None]]:
        """``(result, image_rgb)`` per file in input order, as soon as each is done; nothing is kept.

        Unreadable files give a result with ``error`` set and ``image_rgb`` None. Each record carries the
        SHA-256 of its file; ``previous(image, sha256)``, when given, may return an earlier record of the same
        file, which is yielded (with the decoded image, for the overlays) instead of analysing it again.
        """
        from smear.data.images import file_sha256, file_warnings, read_image

        bar = progress_bar(len(paths), "analyze", progress)
        try:
            for start in range(0, len(paths), self.cfg.batch):
                chunk = paths[start:start + self.cfg.batch]
                loaded: list[tuple[int, np.ndarray]] = []
                images: dict[int, np.ndarray] = {}
                chunk_results: list[ImageResult] = []
                for i, p in enumerate(chunk):
                    digest = file_sha256(p)
                    kept = previous(str(p), digest) if previous else None
                    try:
                        image = read_image(p)
                    except SmearError as e:
                        chunk_results.append(kept or ImageResult(image=str(p), error=str(e), sha256=digest))
                        continue
                    except Exception as e:  # noqa: BLE001  one bad file never stops the batch
                        chunk_results.append(kept or ImageResult(image=str(p), error=f"{p}: {type(e).__name__}: {e}",
                                                                 sha256=digest))
                        continue
                    images[i] = image
                    chunk_results.append(kept or ImageResult(image=str(p), sha256=digest))
                    if kept is None:
                        loaded.append((i, image))
                if loaded:
                    done = self.analyze_arrays([a for _, a in loaded], [str(chunk[i]) for i, _ in loaded])
                    for (i, _), r in zip(loaded, done):
                        r.warnings = file_warnings(chunk[i]) + r.warnings  # decoded, but not whole
                        r.sha256 = chunk_results[i].sha256
                        chunk_results[i] = r
                for i, r in enumerate(chunk_results):
                    yield r, images.get(i)
                    if bar:
                        bar.update(1)
        finally:
            if bar:
                bar.close()

    def analyze_images(self, paths: Sequence[str | Path],
                       on_result: Callable[[ImageResult, np.ndarray | None], None] | None = None,
                       progress: bool = False) -> list[ImageResult]:
        """Analyse image files in order; unreadable files give a result with ``error`` set.

        ``on_result(result, image_rgb)`` is called for each file as soon as it is done, in input
        order (``image_rgb`` is None for a file that failed), so callers can stream outputs.
        Every result is returned, cells included; ``analyze_batch`` keeps none.
        """
        results: list[ImageResult] = []
        for result, image in self.iter_images(paths, progress):
            if on_result:
                on_result(result, image)
            results.append(result)
        return results

    def analyze_batch(self, paths: Sequence[str | Path], slides_of: Sequence[str],
                      on_result: Callable[[ImageResult, np.ndarray | None], None] | None = None,
                      progress: bool = False,
                      previous: Callable[[str, str | None], ImageResult | None] | None = None) -> BatchResult:
        """Analyse a batch of any size in flat memory: slides from running totals, no result kept.

        Each result gets its slide name from ``slides_of`` (one per path) and goes to
        ``on_result(result, image_rgb)`` (write it there: it is dropped afterwards). The slides'
        ``images`` hold one record per field without cells (name and error). ``previous``: as in
        :meth:`iter_images` (``smear analyze --resume``).

        Example:
            >>> batch = analyzer.analyze_batch(paths, ["S1"] * len(paths), on_result=writer.add)
            >>> batch.slides[0].differential["n_wbc"]
        """
        if len(slides_of) != len(paths):
            raise SmearError(f"analyze_batch got {len(paths)} paths but {len(slides_of)} slide names; "
                             "give one slide name per path")
        return self.collect_batch(self.iter_images(paths, progress, previous), slides_of, on_result)

def slide_from_totals(totals: "SlideTotals", cfg: PipelineConfig, images: list[ImageResult] | None = None) -> SlideResult:
    """A slide's counts, ratios, differential, estimates and flags from its running totals (no model needed: the
    review page recomputes a slide from corrected calls with it). RBC morphology is the Analyzer's to add."""
    counts = dict(totals.counts)
    if images is None:
        images = [ImageResult(image=image, error=error, slide=totals.name) for image, error in totals.fields]
    slide = SlideResult(slide=totals.name, images=images, counts=counts, ratios=ratios_from_counts(counts),
                        differential=differential_from_counts(counts), capture_mode=cfg.capture_mode)
    n = totals.n_fields
    est: dict = {"mean_per_field": {k: round(v / n, 2) for k, v in counts.items()} if n else {}}
    if n and cfg.platelet_factor_per_field > 0:
        est["platelets_per_uL"] = round(counts["Platelets"] / n * cfg.platelet_factor_per_field)
    if n and cfg.wbc_factor_per_field > 0 and cfg.capture_mode == "random":
        est["wbc_per_uL"] = round(counts["WBC"] / n * cfg.wbc_factor_per_field)
    if n and cfg.field_area_um2 > 0:
        est["per_mm2"] = {k: round(v / n / cfg.field_area_um2 * 1e6, 1) for k, v in counts.items()}
    slide.estimates = est
    slide.flags = compute_flags(counts, slide.differential, n, cfg, totals.unplaced_wbc,
                                mean_diameter_um(totals.rbc_diameters_px, cfg), totals.rbc_coverage)
    slide.rbc_coverage = totals.rbc_coverage
    return slide


class SlideTotals:
    """Running totals over one slide's fields: all ``Analyzer.slide_result`` needs, and no cells.

    A batch keeps one of these per slide instead of every cell of every field, so its memory
    stays flat however many fields it has. Per field it keeps the name and error (slides.json
    lists them) and one float per RBC (the slide's median RBC size needs every diameter).
    """

    def __init__(self, name: str, low_confidence_wbc: float):
        self.name = name
        self.low_confidence_wbc = low_confidence_wbc
        self.fields: list[tuple[str, str | None]] = []
        self.counts = count_cells([])
        self.unplaced_wbc = 0
        self.rbc_diameters_px = array("d")
        self.morphology_labels: Counter[str] = Counter()
        self.rbc_coverage_sum, self.rbc_coverage_fields = 0.0, 0  # running mean: memory stays flat

    @property
    def n_fields(self) -> int:
        """Fields read and analysed (failed ones excluded)."""
        return sum(1 for _, error in self.fields if not error)

    def add(self, result: ImageResult) -> None:
        self.fields.append((result.image, result.error))
        if result.error:
            return
        for k, v in count_cells(result.cells).items():
            self.counts[k] += v
        self.unplaced_wbc += count_unplaced_wbc(result.cells, self.low_confidence_wbc)
        self.rbc_diameters_px.extend(rbc_diameters_px(result.cells))
        self.morphology_labels.update(c.morphology["label"] for c in result.cells if c.morphology)
        if result.rbc_coverage is not None:
            self.rbc_coverage_sum += result.rbc_coverage
            self.rbc_coverage_fields += 1

    @property
    def rbc_coverage(self) -> float | None:
        """Mean RBC coverage over the slide's fields (None when no field had red-cell pixels)."""
        return round(self.rbc_coverage_sum / self.rbc_coverage_fields, 4) if self.rbc_coverage_fields else None


def count_unplaced_wbc(cells: Iterable[Cell], low_confidence_wbc: float) -> int:
    """WBCs whose subtype the classifier cannot place (probability within the WBC group below the threshold)."""
    return sum(1 for c in cells if c.group == "WBC" and c.classifier.get("score_in_group", 1.0) < low_confidence_wbc)


def rbc_diameters_px(cells: Iterable[Cell]) -> list[float]:
    """Each RBC's diameter in pixels: the mean of its box width and height."""
    return [((c.box[2] - c.box[0]) + (c.box[3] - c.box[1])) / 2 for c in cells if c.group == "RBC"]


def mean_diameter_um(diameters_px: Sequence[float], cfg: PipelineConfig) -> float | None:
    """Mean diameter in micrometres, or None without a pixel size or diameters."""
    if cfg.pixel_size_um <= 0 or not len(diameters_px):
        return None
    return float(np.mean(diameters_px)) * cfg.pixel_size_um


def mean_rbc_diameter_um(cells: Iterable[Cell], cfg: PipelineConfig) -> float | None:
    """Mean RBC diameter of these cells in micrometres, or None without a pixel size or RBCs."""
    return mean_diameter_um(rbc_diameters_px(cells), cfg)


def slide_names(paths: Sequence[Path], roots: Sequence[str | Path], slide: str | None) -> list[str]:
    """Slide of each image: ``--slide NAME`` for all, else the first sub-folder under the given folder, else 'all'.

    Names come from the folders as the user named them: paths are made absolute without following symlinks, so a
    folder of symlinked images (or a symlinked slide folder) keeps its own name."""
    import os

    if slide:
        return [slide] * len(paths)
    dirs = [Path(os.path.abspath(r)) for r in roots if Path(r).is_dir()]
    out = []
    for p in paths:
        rp = Path(os.path.abspath(p))
        name = "all"
        for d in dirs:
            try:
                rel = rp.relative_to(d)
            except ValueError:
                continue
            name = rel.parts[0] if len(rel.parts) > 1 else d.name
            break
        out.append(name)
    return out


def analyze_image(path: str | Path, cfg: PipelineConfig | None = None) -> ImageResult:
    """Analyse one image file with the shipped (or configured) models."""
    return Analyzer(cfg).analyze_images([path])[0]


def analyze_slide(paths: Sequence[str | Path], name: str = "slide", cfg: PipelineConfig | None = None) -> SlideResult:
    """Analyse the fields of one slide and aggregate them."""
    analyzer = Analyzer(cfg)
    results = analyzer.analyze_images(list(paths))
    for r in results:
        r.slide = name
    return analyzer.aggregate_slide(name, results)

