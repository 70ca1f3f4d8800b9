"""One hashed split: the same image lands in the same split wherever it is read, and adding images moves none."""

from __future__ import annotations

import hashlib

from .config import DataConfig
from .formats import SPLITS, AnnotatedImage


def hash_fraction(key: str | bytes, algorithm: str = "sha256") -> float:
    """A key's place in [0, 1]: the first 32 bits of its hash. ``key`` is an id (text) or an image's bytes.

    BCCD-style ids and Chula ids hash with sha256 (their shipped splits); image content with sha1.
    """
    data = key.encode() if isinstance(key, str) else key
    return int(hashlib.new(algorithm, data).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_by_fraction(h: float, val_fraction: float, test_fraction: float = 0.0) -> str:
    """``test`` below ``test_fraction``, then ``val`` for the next ``val_fraction``, else ``train``."""
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"


def assign_splits(images: list[AnnotatedImage], cfg: DataConfig) -> None:
    """Deterministic image-level split for images without one (hash of id and seed)."""
    for ai in images:
        if ai.split in SPLITS:
            continue
        ai.split = split_by_fraction(hash_fraction(f"{cfg.split_seed}:{ai.image_id}"), cfg.val_fraction,
                                     cfg.test_fraction)
