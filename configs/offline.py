"""The environment ultralytics and torchvision run in: offline (no weight, font or asset downloads at
run time) and on every CPU core (ultralytics alone keeps one core idle)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_DONE = False
#: ultralytics settings that would reach the network: analytics ('sync') and the experiment-tracker callbacks
OFFLINE_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wandb", "hub")


def ensure_offline() -> None:
    """Set the offline switches and give ultralytics a local font before it is imported.

    ultralytics fetches Arial.ttf for its plots when the font is missing from its config
    folder; we copy matplotlib's DejaVuSans there instead (same role, shipped in a package).
    """
    global _DONE
    if _DONE:
        return
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_HOME", os.path.expanduser("~/.cache/torch"))
    try:
        import matplotlib

        dejavu = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        from ultralytics.utils import SETTINGS, USER_CONFIG_DIR  # noqa: F401  (imports after env is set)

        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            target = Path(USER_CONFIG_DIR) / name
            if not target.exists() and dejavu.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dejavu, target)
        off = {k: False for k in OFFLINE_SETTINGS if k in SETTINGS and SETTINGS[k] is not False}
        if off:  # only the keys this ultralytics has: an unknown key raises (and 'hub' is not one)
            SETTINGS.update(off)
    except Exception:  # noqa: BLE001  ultralytics missing or read-only config dir: nothing to provide
        pass
    _DONE = True


def use_cpu_threads(threads: int = 0) -> int:
    """Run torch on ``threads`` CPU threads (0: one per core) and keep ultralytics from lowering it.

    ultralytics sets torch to ``cores - 1`` threads whenever it picks a CPU device (every
    ``train``, ``val`` and first ``predict``): on a 2-core machine that is one thread, half the
    machine. Its thread count is a module constant read at that moment, so setting it here holds
    for every later call in this process. Returns the thread count now in use.
    """
    import torch

    n = int(threads) if threads and threads > 0 else (os.cpu_count() or 1)
    try:
        import ultralytics.utils.torch_utils as torch_utils

        torch_utils.NUM_THREADS = n
    except Exception:  # noqa: BLE001  ultralytics missing: torch alone
        pass
    torch.set_num_threads(n)
    return n
