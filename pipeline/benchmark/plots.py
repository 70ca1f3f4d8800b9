"""The benchmark's plots (PNG): confusion matrices, errors per class, predicted versus true counts per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smear.data.taxonomy import GROUPS

from .tables import MODES, OUTCOMES, read_tables


def write_plots(output: Path, s: dict[str, Any]) -> None:
    """Confusion matrices, outcomes per class, and predicted-vs-true counts per class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smear.classifier.evaluate import plot_confusion

    for m in MODES:
        plot_confusion(s["cell"][m]["confusion_matrix"], output / f"confusion_matrix_{m}.png",
                       f"{m}: rows true, columns predicted")
    sub = s["cell"]["pipeline"].get("subtype", {})
    if sub.get("n_matched"):
        plot_confusion(sub["confusion_matrix"], output / "confusion_matrix_subtypes.png", "pipeline: WBC subtypes")

    att = s["attribution"]
    kinds = [o for o in OUTCOMES if o != "correct"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(GROUPS))
    for o in kinds:
        vals = np.array([att["by_true_class"][g].get(o, 0) + att["extra_detections_by_predicted_class"][g].get(o, 0)
                         for g in GROUPS], dtype=float)
        ax.bar(GROUPS, vals, bottom=bottom, label=o.replace("_", " "))
        bottom += vals
    ax.set_ylabel("cells")
    ax.set_title("errors per class (true class; predicted class for false detections and duplicates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "errors_per_class.png", dpi=110)
    plt.close(fig)

    _, _, images = read_tables(output)
    images = images[images["error"] == ""]
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 4))
    for ax, g in zip(np.atleast_1d(axes), GROUPS):
        t = images[f"n_true_{g}"].astype(float)
        hi = 1.0
        for m, marker in (("detector", "x"), ("pipeline", "o")):
            p = images[f"n_{m}_{g}"].astype(float)
            ax.scatter(t, p, marker=marker, alpha=0.6, label=m, facecolors="none" if marker == "o" else None,
                       edgecolors="C1" if marker == "o" else None)
            hi = max(hi, float(p.max()) if len(p) else 0.0)
        hi = max(hi, float(t.max()) if len(t) else 0.0) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel(f"true {g} per image")
        ax.set_ylabel(f"predicted {g} per image")
        ax.set_title(g)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "counts_scatter.png", dpi=110)
    plt.close(fig)

