"""One progress bar for every loop over files (tqdm when installed, else ultralytics' own TQDM)."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A bar with rate and ETA on stderr, or None when disabled, empty, or no bar library exists."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        try:
            from ultralytics.utils.tqdm import TQDM as tqdm  # ultralytics >= 8.3.200 ships its own
        except ImportError:
            return None
    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr)
