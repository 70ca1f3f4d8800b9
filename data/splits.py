"""One hashed split: the same image lands in the same split wherever it is read."""

from __future__ import annotations

import hashlib

from .config import DataConfig
from .formats import SPLITS, AnnotatedImage


def assign_splits(images: list[AnnotatedImage], cfg: DataConfig) -> None:
    """Deterministic image-level split for images without one (hash of id and seed)."""
    for ai in images:
        if ai.split in SPLITS:
            continue
        h = int(hashlib.sha256(f"{cfg.split_seed}:{ai.image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        ai.split = "test" if h < cfg.test_fraction else "val" if h < cfg.test_fraction + cfg.val_fraction else "train"
