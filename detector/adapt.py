"""Re-estimate a detector's batch-norm statistics on a lab's own fields, without labels (AdaBN).

Each batch-norm layer normalises a feature by the mean and variance it saw in training. Fields of a lab the
detector never saw (another stain, camera, focus) shift those statistics before any learned weight is wrong;
re-estimating them on the new lab's images (Li et al. 2016, "Revisiting batch normalization for practical domain
adaptation"; Schneider et al. 2020) needs no labels and no training, only the lab's fields as the detector sees
them: brought to the training RBC size (``scale="auto"``) and cut into tiles as :class:`Detector` does. The
weights are left as they are; the result is a model folder like any other, its card saying which fields set its
statistics.

Measured with ``benchmarks/detector_sources.py --adapt-from`` on a lab left out of training (docs/models.md,
2026-12-02): it failed its rule (mAP50 fell on Raabin's fields), so no command offers it to users.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from smear.configs.errors import SmearError
from smear.configs.offline import ensure_offline
from smear.configs.paths import git_commit, machine_description

from .interpolate import _load
from .predict import Detector, tile_origins

log = logging.getLogger(__name__)

#: Card sections that still hold for a detector whose batch-norm statistics changed (the rest were measured on the
#: weights as they were and are dropped)
KEPT_CARD_KEYS = ("kind", "classes", "config", "data", "split", "operating_thresholds", "operating_thresholds_choice",
                  "rbc_median_diameter_px", "stain_norm", "limitations")
#: Fields per forward pass: batch statistics over several fields, as in training (batches of 16), so the average
#: variance holds the spread between fields too (per field it came out narrower and halved the RBCs found)
BATCH = 16


def fields_as_seen(det: Detector, images_rgb: Iterable[np.ndarray], scale: float | str = "auto"
                   ) -> Iterator[np.ndarray]:
    """Each field as the detector's network sees it: BGR, resized to the training RBC size (``scale="auto"``
    measures it with ``det``), cut into tiles when larger than 1.5 tiles, as :meth:`Detector.predict` does."""
    import cv2

    tile, overlap = det.cfg.tile_px, det.cfg.tile_overlap_px
    conf = det.info.card.get("operating_thresholds") or None  # the card's thresholds measure the RBC size, as in use
    for img in images_rgb:
        k = det.predict([img], conf=conf, scale=scale)[0].scale if scale == "auto" else float(scale)
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        if k != 1.0:
            bgr = cv2.resize(bgr, None, fx=k, fy=k, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        h, w = bgr.shape[:2]
        if max(h, w) <= 1.5 * tile:
            yield bgr
            continue
        for y in tile_origins(h, tile, overlap):
            for x in tile_origins(w, tile, overlap):
                yield bgr[y:y + tile, x:x + tile]


def recalibrate_batchnorm(weights: str | Path | None, images_rgb: Iterable[np.ndarray], dest: Path,
                          scale: float | str = "auto", source: str = "", min_inputs: int = 256) -> Path:
    """Write a copy of detector ``weights`` whose batch-norm statistics are re-estimated on ``images_rgb``, as a
    model folder ``dest``.

    The fields, brought to the training RBC size, pass through ultralytics' own training transforms with the
    model's training settings (its checkpoint's ``train_args``) in the regime of its last epochs (no mosaic):
    the statistics a network keeps are those of the inputs it was trained on (square, padded, scale-jittered),
    and fields fed as at inference instead (measured on BCCD val, in-domain) moved them so far that half the
    RBCs were lost. Batches of ``BATCH``, every field seen in several random versions until ``min_inputs``.

    Raises:
        SmearError: when no image was given, or the model has no batch-norm layer.
    """
    import tempfile

    import cv2
    import torch
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.utils import LOGGER as ULTRALYTICS_LOG

    from smear.configs.modelcard import write_card

    ensure_offline()
    t0 = time.time()
    det = Detector(weights)
    path, ckpt, model, card = _load(det.info.weights)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise SmearError(f"{path}: the model has no batch-norm layer to re-estimate")
    trained = ckpt.get("train_args") or {}  # the model's training settings over ultralytics' defaults
    hyp = get_cfg({**DEFAULT_CFG_DICT, **{k: v for k, v in trained.items() if k in DEFAULT_CFG_DICT
                                          and k not in ("data", "model", "cfg")}})
    hyp.imgsz = det.imgsz
    n_fields = n_inputs = n_batches = 0
    with tempfile.TemporaryDirectory(prefix="smear-adabn-") as tmp:
        (Path(tmp) / "images").mkdir()
        (Path(tmp) / "labels").mkdir()
        for image in images_rgb:
            n_fields += 1
            for bgr in fields_as_seen(det, [image], scale):
                name = f"{n_inputs:06d}"
                cv2.imwrite(str(Path(tmp) / "images" / f"{name}.png"), bgr)
                (Path(tmp) / "labels" / f"{name}.txt").write_text("")  # no labels: only the images are used
                n_inputs += 1
        if not n_inputs:
            raise SmearError("no field to re-estimate the batch-norm statistics on")
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        level = ULTRALYTICS_LOG.level
        ULTRALYTICS_LOG.setLevel(logging.ERROR)  # its warning that the (deliberately) empty labels may not train
        try:
            dataset = build_yolo_dataset(hyp, str(Path(tmp) / "images"), BATCH,
                                         {"names": names, "nc": len(names), "channels": 3}, mode="train",
                                         stride=int(max(float(model.stride.max()), 32)))
        finally:
            ULTRALYTICS_LOG.setLevel(level)
        dataset.close_mosaic(hyp)
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch, not an exponential one
            m.train()
        rng = np.random.default_rng(0)
        order: list[int] = []
        while len(order) < max(min_inputs, n_inputs):
            order += rng.permutation(len(dataset)).tolist()
        with torch.no_grad():
            for k in range(0, len(order) - BATCH // 2, BATCH):  # every batch at least half full: they weigh alike
                batch = dataset.collate_fn([dataset[i] for i in order[k:k + BATCH]])
                model(batch["img"].float() / 255.0)
                n_batches += 1
        for m in norms:
            m.momentum = 0.1
        model.eval()
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "ema", "updates", "scaler")}
    out["model"] = copy.deepcopy(model).half()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(out, dest / "weights.pt")
    new_card = {k: v for k, v in card.items() if k in KEPT_CARD_KEYS}
    new_card.update({
        "summary": (f"{Path(path).parent.name} with its batch-norm statistics re-estimated on {n_fields} unlabelled "
                    f"fields{f' of {source}' if source else ''} (AdaBN); its weights and operating thresholds are "
                    "the base model's. Figures measured on the base model do not carry over, so none is copied."),
        "batchnorm_adaptation": {
            "base_model": {"weights": str(path), "date": card.get("date"), "commit": card.get("commit")},
            "fields": n_fields, "network_inputs": n_inputs, "batches": n_batches, "source": source, "scale": scale,
            "layers": len(norms),
            "method": ("running mean and variance of every batch-norm layer replaced by their cumulative average over "
                       "batches of the fields (at the training RBC size) through the training transforms of the "
                       "model's last epochs"),
            "minutes": round((time.time() - t0) / 60, 2)},
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": machine_description("cpu")})
    write_card(dest, new_card, f"Detector {dest.name}")
    log.info("batch-norm statistics of %s re-estimated on %d fields (%d inputs), written to %s", path, n_fields,
             n_inputs, dest)
    return dest
